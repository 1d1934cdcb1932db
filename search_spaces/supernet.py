"""The differentiable supernet: every op slot of a space holds a MixedOp over its candidates.

One architecture parameter vector α per slot (zeros: uniform), shared by every cell that uses
the slot (LENAS shares one down-cell and one up-cell design across levels). Modes:

- ``softmax`` (DARTS): a slot's output is Σ softmax(α)_i · op_i(x);
- ``gumbel`` (GDAS): per forward, one hard one-hot Gumbel-softmax sample per slot with a
  straight-through gradient to α; only the sampled candidate is computed;
- ``fix(g)``: the single path of genotype ``g`` with the shared weights (weight inheritance).

The network is built by the space's own ``construct`` with the same cells and macro as a final
network, so what the search evaluates is what ``SearchSpace.build`` later builds.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas_dose.errors import NasDoseError

from .genotype import Genotype
from .ops import make_op
from .space import SearchSpace

Mode = Literal["softmax", "gumbel"]
MODES: tuple[Mode, ...] = ("softmax", "gumbel")


class MixedOp(nn.Module):
    """All candidates of one slot; the Supernet sets which path(s) and weights each forward uses."""

    def __init__(self, slot: str, kind: str, candidates: list[str], c_in: int, c_out: int) -> None:
        super().__init__()
        self.slot = slot
        self.candidates = nn.ModuleDict({n: make_op(n, kind, c_in, c_out, slot=slot) for n in candidates})
        self.weights: torch.Tensor | None = None  # softmax or one-hot weights over the candidates
        self.index: int | None = None  # the single candidate to run (gumbel sample or fixed path)

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        ops = list(self.candidates.values())
        if self.index is not None:
            y = ops[self.index](x, *args)
            return y if self.weights is None else self.weights[self.index] * y
        if self.weights is None:
            raise RuntimeError(f"MixedOp '{self.slot}' was called outside its Supernet's forward")
        return sum(w * op(x, *args) for w, op in zip(self.weights, ops))


class Supernet(nn.Module):
    """A space's network with its op slots mixed; see the module docstring."""

    def __init__(self, space: SearchSpace, macro: Mapping[str, Any] | None = None,
                 fixed: Mapping[str, Any] | None = None, mode: str = "softmax", tau: float = 1.0) -> None:
        super().__init__()
        where = f"supernet of space '{space.name}'"
        self.space = space
        self.macro = space.check_macro(macro or {}, where)
        self.fixed = {**space.default_choices(), **space.check_choices(dict(fixed or {}), where, complete=False)}
        self._candidates = space.slots()
        groups: dict[str, list[MixedOp]] = {s: [] for s in space.op_slots() if s not in self.fixed}

        def make(slot: str, kind: str, c_in: int, c_out: int) -> nn.Module:
            if slot not in groups:
                return make_op(self.fixed[slot], kind, c_in, c_out, slot=slot)
            mixed = MixedOp(slot, kind, self._candidates[slot], c_in, c_out)
            groups[slot].append(mixed)
            return mixed

        self.net = space.construct(self.fixed, self.macro, make)
        self._groups = {s: ms for s, ms in groups.items() if ms}  # slots this macro actually uses
        self.mixed_slots = list(self._groups)
        self.alphas = nn.ParameterList(nn.Parameter(torch.zeros(len(self._candidates[s]))) for s in self.mixed_slots)
        self.mode = mode
        self.tau = tau
        self._path: Genotype | None = None

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise NasDoseError(f"supernet: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self._mode = mode

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.alphas)

    def weight_parameters(self, outer: nn.Module | None = None) -> list[nn.Parameter]:
        """Every parameter but α: the supernet's, or those of `outer`, a network around it (a
        conditioned network's preference embedding trains with the supernet's weights)."""
        arch = {id(p) for p in self.alphas}
        return [p for p in (outer or self).parameters() if id(p) not in arch]

    def arch_weights(self) -> dict[str, list[float]]:
        """softmax(α) per mixed slot, candidates in ``space.slots()`` order."""
        return {s: F.softmax(a.detach(), -1).tolist() for s, a in zip(self.mixed_slots, self.alphas)}

    def genotype(self) -> Genotype:
        """The strongest op per mixed slot, plus the fixed slots and the macro.

        An op slot this macro never uses (e.g. a level below a fixed depth) takes its first candidate.
        """
        strongest = {s: self._candidates[s][int(a.argmax())] for s, a in zip(self.mixed_slots, self.alphas)}
        choices = {s: strongest.get(s, self.fixed.get(s, cands[0])) for s, cands in self._candidates.items()}
        return self.space.genotype(choices, self.macro)

    def fix(self, g: Genotype | None) -> None:
        """Run only ``g``'s path with the shared weights from now on; ``None`` returns to mixing."""
        self._path = None if g is None else self._check_compatible(g)
        for slot, mixed in self._groups.items():
            index = None if g is None else self._candidates[slot].index(g.choices[slot])
            for m in mixed:
                m.weights, m.index = None, index

    def subnet_state_dict(self, g: Genotype) -> dict[str, torch.Tensor]:
        """A state dict for ``space.build(g)``: g's ops' shared weights (weight inheritance)."""
        self._check_compatible(g)
        chosen = {name: g.choices[m.slot] for name, m in self.net.named_modules() if isinstance(m, MixedOp)}
        out = {}
        for key, value in self.net.state_dict().items():
            head, sep, rest = key.partition(".candidates.")
            if sep and head in chosen:
                op, _, tail = rest.partition(".")
                if op != chosen[head]:
                    continue
                key = f"{head}.{tail}"
            out[key] = value
        return out

    def subnet(self, g: Genotype) -> nn.Module:
        """``space.build(g)`` initialized with the supernet's weights for g's path."""
        net = self.space.build(g)
        net.load_state_dict(self.subnet_state_dict(g))
        return net

    def _check_compatible(self, g: Genotype) -> Genotype:
        where = f"supernet of space '{self.space.name}'"
        self.space.validate(g, where)
        if self.space.check_macro(g.macro, where) != self.macro:
            raise NasDoseError(f"{where}: genotype macro {g.macro} differs from the supernet's {self.macro}")
        for slot, value in self.fixed.items():
            if g.choices[slot] != value:
                raise NasDoseError(f"{where}: slot '{slot}' is fixed to {value!r} here, "
                                   f"genotype has {g.choices[slot]!r}")
        return g

    def _select(self) -> None:
        """Draw this forward's weights (softmax) or one path per slot (gumbel)."""
        for slot, alpha in zip(self.mixed_slots, self.alphas):
            if self._mode == "softmax":
                weights, index = F.softmax(alpha, -1), None
            else:
                weights = F.gumbel_softmax(alpha, tau=self.tau, hard=True)
                index = int(weights.argmax())
            for m in self._groups[slot]:
                m.weights, m.index = weights, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._path is not None:
            return self.net(x)
        self._select()
        try:
            return self.net(x)
        finally:  # drop the per-step weights so no graph outlives the step
            for mixed in self._groups.values():
                for m in mixed:
                    m.weights, m.index = None, None
