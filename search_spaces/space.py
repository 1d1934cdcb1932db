"""SearchSpace base class, the space registry, and plugin imports.

A space declares its slots (slot name -> ordered candidates), its default macro, and how to
construct a network from a slot factory. Everything else (NNI mutable, sampling, validation,
building, the supernet, mutation, distance) is derived here, so a new space is one small class.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from nas_dose.errors import NasDoseError
from nas_dose.io import load_yaml
from nas_dose.registry import Registry, import_module

from .cells import SlotFactory
from .genotype import Genotype, check_fields
from .measure import meta_forward
from .ops import list_ops, make_op


class SearchSpace:
    """Base class of search spaces; subclasses are registered with ``@register_space(name)``.

    Subclasses implement ``slots``, ``default_macro`` and ``construct``; override
    ``default_choices`` (non-op slots), ``active_slots`` or ``check_macro`` when needed.
    """

    name: str = ""
    version: int = 1

    # -- what a subclass defines ---------------------------------------------------------------

    def slots(self) -> dict[str, list]:
        """Slot name -> ordered candidates (op names, or ints/strs for width/depth slots)."""
        raise NotImplementedError

    def default_macro(self) -> dict[str, Any]:
        raise NotImplementedError

    def construct(self, choices: Mapping[str, Any], macro: Mapping[str, Any], make: SlotFactory) -> nn.Module:
        """Build the network; op slots are filled by ``make(slot, kind, c_in, c_out)``.

        ``choices`` holds at least every non-op slot; op slots are read only through ``make``
        (which places a single op in a final network and a MixedOp in the supernet).
        """
        raise NotImplementedError

    def small_macro(self) -> dict[str, Any]:
        """A CPU-sized macro for tests and quick runs; override when the default is large."""
        return self.default_macro()

    # -- derived ---------------------------------------------------------------------------------

    def op_slots(self) -> list[str]:
        """The slots whose candidates are all registered ops: those a supernet can mix."""
        ops = set(list_ops())
        return [s for s, cands in self.slots().items() if all(isinstance(c, str) and c in ops for c in cands)]

    def default_choices(self) -> dict[str, Any]:
        """Values of the non-op slots when nothing fixes them (the supernet's): the last candidate."""
        ops = set(self.op_slots())
        return {s: cands[-1] for s, cands in self.slots().items() if s not in ops}

    def active_slots(self, g: Genotype) -> list[str]:
        """The slots that change ``g``'s network (all of them unless, e.g., a depth slot hides some)."""
        return list(self.slots())

    def canonical(self, g: Genotype) -> Genotype:
        """``g`` with every slot its network does not use (outside `active_slots`) at its first
        candidate: genotypes that build one network are then equal (one key), so a search scores
        that network once and a pool holds it once. Every genotype the space makes or loads is so."""
        active, slots = set(self.active_slots(g)), self.slots()
        choices = {s: v if s in active else slots[s][0] for s, v in g.choices.items()}
        return g if choices == g.choices else Genotype(g.space, g.version, choices, g.macro)

    def size(self) -> int:
        """Number of architectures (product of the candidate counts)."""
        return math.prod(len(c) for c in self.slots().values())

    def mutable(self):
        """One ``nni.mutable.Categorical`` per slot (label = slot name), in a ``MutableDict``.

        NNI is imported on first use (about a second), not when nasdose is imported.
        """
        from nni.mutable import Categorical, MutableDict  # NNI (heavy) only when a mutable is asked for

        return MutableDict({s: Categorical(list(c), label=s) for s, c in self.slots().items()})

    def check_macro(self, macro: Mapping[str, Any], source: str = "") -> dict[str, Any]:
        """The default macro updated with ``macro``; unknown keys and bad types are errors."""
        where = source or f"search space '{self.name}'"
        out = self.default_macro()
        for key, value in macro.items():
            if key not in out:
                raise NasDoseError(f"{where}: unknown macro key '{key}' (known: {', '.join(out)})")
            default = out[key]
            if isinstance(default, (list, tuple)):
                ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(_positive_int(v) for v in value)
                value = list(value) if ok else value
                expected = "a non-empty list of positive integers"
            else:
                ok = _positive_int(value)
                expected = "a positive integer"
            if not ok:
                raise NasDoseError(f"{where}: macro '{key}' must be {expected}, got {value!r}")
            out[key] = value
        return out

    def check_choices(self, choices: Mapping[str, Any], source: str = "", complete: bool = True) -> dict[str, Any]:
        """Validate slot values (all slots, or only those given), in slot order. Plain Python, as
        NNI's categorical sample checks do, so that loading and building a genotype never needs NNI
        (a machine without it predicts with searched networks). Errors name the slot and the op."""
        where = source or f"search space '{self.name}'"
        slots = self.slots()
        for slot, value in choices.items():
            if slot not in slots:
                raise NasDoseError(f"{where}: unknown slot '{slot}' in space '{self.name}'")
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise NasDoseError(f"{where}: slot '{slot}': {value!r} is not an op name or an integer")
            if value not in slots[slot]:
                raise NasDoseError(f"{where}: slot '{slot}': {value!r} is not allowed "
                                   f"(allowed: {', '.join(map(str, slots[slot]))})")
        missing = [s for s in slots if s not in choices]
        if complete and missing:
            raise NasDoseError(f"{where}: missing slot '{missing[0]}'")
        return {s: choices[s] for s in slots if s in choices}

    def validate(self, g: Genotype, source: str = "") -> None:
        """Check space, version, every slot and the macro."""
        where = source or "genotype"
        if g.space != self.name:
            raise NasDoseError(f"{where}: genotype of space '{g.space}' given to space '{self.name}'")
        if g.version != self.version:
            raise NasDoseError(f"{where}: space '{self.name}' version {g.version} is not supported "
                               f"(this nasdose has version {self.version})")
        self.check_choices(g.choices, where)
        self.check_macro(g.macro, where)
        missing = [k for k in self.default_macro() if k not in g.macro]
        if missing:
            raise NasDoseError(f"{where}: missing macro key '{missing[0]}'")

    def genotype(self, choices: Mapping[str, Any], macro: Mapping[str, Any] | None = None,
                 source: str = "") -> Genotype:
        """A validated genotype from slot values (e.g. an NNI sample) and a (partial) macro."""
        g = Genotype(self.name, self.version, dict(choices), self.check_macro(macro or {}, source))
        self.validate(g, source)
        return self.canonical(g)

    def sample(self, rng: np.random.RandomState, macro: Mapping[str, Any] | None = None) -> Genotype:
        """A uniformly random architecture, drawn by NNI (which needs a ``RandomState``)."""
        return self.genotype(self.mutable().random(random_state=rng), macro)

    def mutate(self, g: Genotype, rng: np.random.RandomState) -> Genotype:
        """Change exactly one active slot to a different candidate (evolution's mutation). Slots
        the change brings into use (a deeper network's new levels) are drawn at random, as in a
        sample, not left at their canonical first candidate."""
        slots = self.slots()
        movable = [s for s in self.active_slots(g) if len(slots[s]) > 1]
        slot = movable[rng.randint(len(movable))]
        others = [c for c in slots[slot] if c != g.choices[slot]]
        choices = {**g.choices, slot: others[rng.randint(len(others))]}
        was = set(self.active_slots(g))
        woken = [s for s in self.active_slots(Genotype(g.space, g.version, choices, g.macro)) if s not in was]
        choices.update({s: slots[s][rng.randint(len(slots[s]))] for s in woken})
        return self.genotype(choices, g.macro)

    def distance(self, a: Genotype, b: Genotype) -> float:
        """Fraction of slots whose values differ, in [0, 1]."""
        if a.space != self.name or b.space != self.name:
            raise NasDoseError(f"search space '{self.name}': cannot compare genotypes of '{a.space}' and '{b.space}'")
        slots = list(self.slots())
        return sum(a.choices.get(s) != b.choices.get(s) for s in slots) / len(slots)

    def build(self, g: Genotype) -> nn.Module:
        """The final network of ``g``: plain ``torch.nn`` modules, one op per slot."""
        self.validate(g)
        return self.construct(g.choices, g.macro, _single_op_factory(g.choices))

    def fitted(self, macro: Mapping[str, Any], grid: int) -> tuple[SearchSpace, dict[str, list]]:
        """This space without the values of its non-op slots (width, depth) that a ``grid``³ input
        cannot take (a depth whose bottleneck would be one voxel), and what was removed, so that a
        search never proposes them instead of failing in the middle. Each combination of those
        slots is tried on the meta device (shapes only) with the first candidate of every op."""
        slots, ops = self.slots(), set(self.op_slots())
        macro = self.check_macro(macro)
        shape = (1, macro["in_channels"], grid, grid, grid)
        first = {s: c[0] for s, c in slots.items() if s in ops}
        other = {s: c for s, c in slots.items() if s not in ops}

        def fits(values: tuple[Any, ...]) -> bool:
            choices = {**first, **dict(zip(other, values))}
            try:
                with torch.device("meta"):  # nothing allocated, nothing computed
                    meta_forward(self.construct(choices, macro, _single_op_factory(choices)), shape)
            except (NasDoseError, RuntimeError, ValueError):
                return False
            return True

        fitting = [values for values in itertools.product(*other.values()) if fits(values)]
        if not fitting:
            raise NasDoseError(f"search space '{self.name}': no network of it takes a {grid}³ input "
                               f"with macro {macro}")
        removed = {s: [v for v in c if all(f[i] != v for f in fitting)] for i, (s, c) in enumerate(other.items())}
        removed = {s: v for s, v in removed.items() if v}
        return (_Restricted(self, removed), removed) if removed else (self, {})

class _Restricted(SearchSpace):
    """A space with some candidates removed (`SearchSpace.fitted`); its genotypes are the inner
    space's (same name and version), so they load and build without the restriction."""

    def __init__(self, inner: SearchSpace, removed: Mapping[str, list]) -> None:
        self.inner, self.removed = inner, dict(removed)
        self.name, self.version = inner.name, inner.version

    def slots(self) -> dict[str, list]:
        return {s: [v for v in c if v not in self.removed.get(s, [])] for s, c in self.inner.slots().items()}

    def default_macro(self) -> dict[str, Any]:
        return self.inner.default_macro()

    def small_macro(self) -> dict[str, Any]:
        return self.inner.small_macro()

    def check_macro(self, macro: Mapping[str, Any], source: str = "") -> dict[str, Any]:
        return self.inner.check_macro(macro, source)

    def active_slots(self, g: Genotype) -> list[str]:
        return self.inner.active_slots(g)

    def construct(self, choices: Mapping[str, Any], macro: Mapping[str, Any], make: SlotFactory) -> nn.Module:
        return self.inner.construct(choices, macro, make)


def genotype_from_dict(d: Any, source: str = "") -> Genotype:
    """Parse and validate against its space; errors start with ``source`` (a file name) and name
    the bad field, slot or op."""
    where = source or "genotype"
    fields = check_fields(d, where)
    space = get_space(fields["space"], source=where)
    g = Genotype(fields["space"], fields["version"], dict(fields["choices"]),
                 space.check_macro(fields["macro"], where))
    space.validate(g, source=where)
    return space.canonical(g)


def load_genotype(path: str | Path) -> Genotype:
    return genotype_from_dict(load_yaml(path), source=str(path))


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _single_op_factory(choices: Mapping[str, Any]) -> SlotFactory:
    def make(slot: str, kind: str, c_in: int, c_out: int) -> nn.Module:
        return make_op(choices[slot], kind, c_in, c_out, slot=slot)

    return make


# ---------------------------------------------------------------------------------------------
# registry

SPACES: Registry[type[SearchSpace]] = Registry("search space", base=SearchSpace, named=True)


def register_space(name: str) -> Callable[[type[SearchSpace]], type[SearchSpace]]:
    """Class decorator: register a SearchSpace subclass under ``name`` (sets ``cls.name``)."""
    return SPACES.register(name)


def list_spaces() -> list[str]:
    """Names of the registered spaces, sorted."""
    return SPACES.names()


def get_space(name: str, source: str = "") -> SearchSpace:
    """A space by registered name, or by import path ``package.module:ClassName``.

    A space loaded by path that is not registered takes the path as its name, so its
    genotypes record where to find it.
    """
    return SPACES.get(name, source).obj()


def import_plugins(modules: list[str]) -> None:
    """Import modules that register ops or spaces as a side effect (``mypkg.ops``)."""
    for module in modules:
        import_module(module, "plugin")


def build_model(g: Genotype) -> nn.Module:
    """The final network of a genotype of any registered (or import-path) space."""
    return get_space(g.space).build(g)
