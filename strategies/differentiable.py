"""DARTS-style differentiable search (LENAS's U-NAS), first order, on the space's own supernet.

Each step first updates the network weights on a batch of weight patients, then the
architecture parameters α on a batch drawn at random from the architecture patients, a fresh
one every step (LENAS reused one batch). With references (sequential diversity mode) the
architecture loss adds weight × max(0, margin − disagreement) against each earlier member's
prediction on the same patients: α is what has to move for the new network to differ.

The supernet is `Supernet(space, ctx.macro)`, the same cells and macro as the network
that is finally built. At the end, the `candidates` most probable genotypes under α (the first
is the strongest op per slot) are scored by the supernet fixed to each on the architecture
patients. The search's answer comes first in the returned list: the strongest-op genotype
(`derive: argmax`, as DARTS and LENAS) or the best-scoring one (`derive: score`); the others
follow by score. State is checkpointed each epoch; a resumed search continues exactly.

Under torchrun both steps are data-parallel: each rank takes its share of every batch
(`batch_size` is the global batch) and the stepped parameters' gradients are averaged over the
ranks; the final candidates are scored spread over the ranks (docs/how-to/distributed.md).

For a cascade's stage (`ctx.cascade`) the supernet runs in a Refiner on source-grid patches
drawn anew each epoch; the sequential hinge is refused there (see `check_stage_search`). For
conditioned networks (`ctx.conditioning`) the supernet is conditioned, each step's patients are on
one of their preference plans each, and candidates are scored on every plan; the sequential
hinge is refused there too (`check_conditioned`).

In a sequential run (strategies/search.py) each search has its own `ctx.seed` (its supernet's
initial weights, batch order, Gumbel draws) and trains its own supernet from scratch: weights and
α co-adapt under the hinge against that search's references, so the previous search's supernet
is not reused (unlike the SPOS supernet of the scoring strategies). What carries over is only the
earlier members' predictions, as references. With derive=argmax the answer is the member, and
`hinge_acted` says whether the hinge was non-zero at any architecture step.
"""
from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
import torch

from nas_dose import distributed
from nas_dose.config import ConfigError, to_dict
from nas_dose.errors import NasDoseError
from nas_dose.io import load_checkpoint, save_checkpoint
from nas_dose.pool import Candidate
from nas_dose.pool.diversity import DiversityConfig, diversity_hinge
from nas_dose.progress import progress
from nas_dose.runtime import rng_state, seed_everything, set_rng_state
from nas_dose.search_spaces import Genotype, SearchSpace, Supernet
from nas_dose.training import OptimConfig, masked_loss
from nas_dose.training.engine import forward
from nas_dose.training.losses import share_weight
from nas_dose.training.optimization import make_optimizer

from .base import SearchContext, Strategy, register_strategy

STATE = "differentiable.pt"
RESULT = "differentiable_result.pt"


@dataclass
class DifferentiableConfig:
    """Options of the differentiable search (defaults: LENAS's 30 × 50 steps, batch 1, Adam 1e-3)."""

    mode: Literal["softmax", "gumbel"] = "softmax"
    epochs: int = 30
    steps_per_epoch: int = 50
    warmup_epochs: int = 0  # weight-only epochs before α starts to move
    batch_size: int = 1
    weight_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    arch_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    tau_start: float = 5.0  # gumbel temperature, decayed geometrically to tau_end over the epochs
    tau_end: float = 0.5
    candidates: int = 8  # most probable genotypes under α to score at the end
    track_score: bool = True  # score the strongest-op genotype after each epoch (fitness over time)
    derive: Literal["argmax", "score"] = "argmax"  # the answer: strongest ops, or best inherited score

    def validate(self) -> None:
        for key, low in (("epochs", 1), ("steps_per_epoch", 1), ("warmup_epochs", 0), ("batch_size", 1),
                         ("candidates", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"config key '{key}': must be at least {low}, got {getattr(self, key)}")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"config key 'warmup_epochs': {self.warmup_epochs} leaves no architecture "
                              f"epochs of {self.epochs}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ConfigError(f"config key 'tau_end': need 0 < tau_end <= tau_start, got {self.tau_end}, "
                              f"{self.tau_start}")


def tau_at(cfg: DifferentiableConfig, epoch: int) -> float:
    """Geometric decay from tau_start (first epoch) to tau_end (last)."""
    if cfg.epochs == 1:
        return cfg.tau_start
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (epoch / (cfg.epochs - 1))


def most_probable(space: SearchSpace, base: Genotype, probs: dict[str, list[float]], n: int
                  ) -> list[tuple[Genotype, float]]:
    """The n genotypes of highest probability under independent per-slot distributions `probs`,
    with their log-probabilities, most probable first; slots outside `probs` keep `base`'s values.

    Best-first enumeration over per-slot ranks: the argmax, then single-slot runner-ups, and so on.
    """
    slots = list(probs)
    cands = space.slots()
    order = {s: sorted(range(len(probs[s])), key=lambda i: -probs[s][i]) for s in slots}

    def logp(ranks: tuple[int, ...]) -> float:
        return sum(math.log(max(probs[s][order[s][r]], 1e-300)) for s, r in zip(slots, ranks))

    start = (0,) * len(slots)
    heap = [(-logp(start), start)]
    seen = {start}
    out: list[tuple[Genotype, float]] = []
    while heap and len(out) < n:
        neg, ranks = heapq.heappop(heap)
        choices = {**base.choices, **{s: cands[s][order[s][r]] for s, r in zip(slots, ranks)}}
        out.append((space.genotype(choices, base.macro), -neg))
        for i, s in enumerate(slots):
            if ranks[i] + 1 < len(probs[s]):
                nxt = ranks[:i] + (ranks[i] + 1,) + ranks[i + 1:]
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (-logp(nxt), nxt))
    return out


def _digest(predictions: dict[str, np.ndarray], ids: list[str]) -> str:
    """A fingerprint of a reference's predictions on `ids` (resume must not mix references)."""
    h = hashlib.sha1()
    for pid in ids:
        if pid in predictions:
            h.update(pid.encode())
            h.update(np.ascontiguousarray(predictions[pid], dtype=np.float32).tobytes())
    return h.hexdigest()


def _stream_seed(seed: int, epoch: int, stream: int) -> int:
    """An independent, reproducible seed per (search seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def _batches(ctx: SearchContext, ids: list[str], batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Shuffled batches without end: a new random order each pass, all drawn from `seed`; in a
    distributed search, this rank's share of each (batch_size is the global batch)."""
    loader = ctx.loader(ids, train=True, batch_size=batch_size, seed=seed, shard=True)
    while True:
        yield from loader


@register_strategy("differentiable")
class DifferentiableSearch(Strategy):
    """First-order DARTS/GDAS on the space's supernet; see the module docstring."""

    Config = DifferentiableConfig
    uses_references = True
    predictions_from = "the supernet fixed to each genotype (inherited weights, no retraining)"
    searches_stages = True

    @classmethod
    def check_stage_search(cls, diversity: DiversityConfig) -> None:
        """Its sequential hinge compares predictions on the training batches, which for a stage are
        random patches no earlier member predicted."""
        if diversity.mode == "sequential":
            raise NasDoseError("strategy 'differentiable' cannot search a cascade's stage with "
                               "diversity.mode=sequential (its hinge needs whole-volume predictions); "
                               "use diversity.mode=pool or none, or strategy evolution")

    @classmethod
    def check_conditioned(cls, diversity: DiversityConfig) -> None:
        """Its sequential hinge compares a batch's predictions with the members' for the same
        patients, which for conditioned networks hold every plan while a batch holds one."""
        if diversity.mode == "sequential":
            raise NasDoseError("strategy 'differentiable' cannot search conditioned networks with "
                               "diversity.mode=sequential (its hinge needs one prediction per patient); "
                               "use diversity.mode=pool or none, or strategy evolution")

    def __init__(self, config: DifferentiableConfig) -> None:
        super().__init__(config)
        self.history: list[dict[str, list[float]]] = []  # softmax(α) per slot: at start, after each epoch
        self.hinge = 0.0  # the sum of the epochs' mean hinge (0: the references never acted on α)

    def hinge_acted(self) -> bool | None:
        """With derive=argmax the answer is the search's own, so whether the hinge moved α."""
        return self.hinge > 0 if self.config.derive == "argmax" else None

    def _fingerprint(self, ctx: SearchContext) -> dict[str, Any]:
        """What a resumed search must share with the interrupted one."""
        return {"config": to_dict(self.config), "seed": ctx.seed, "space": ctx.space.name,
                "macro": dict(ctx.macro), "weight_ids": list(ctx.weight_ids), "arch_ids": list(ctx.arch_ids),
                "references": [_digest(ref, ctx.arch_ids) for ref in ctx.references],
                "diversity": to_dict(ctx.diversity)}

    def _check(self, state: dict[str, Any], ctx: SearchContext, path: Any) -> None:
        if state.get("fingerprint") != self._fingerprint(ctx):
            raise NasDoseError(f"{path}: saved by a different search (config, seed, patients or references); "
                               "resume with the same settings or start in a new folder")

    def _reference_tensors(self, ctx: SearchContext) -> list[dict[str, torch.Tensor]]:
        """Each reference's predictions on the architecture patients, as (1, G, G, G) tensors, once."""
        refs = []
        for k, ref in enumerate(ctx.references):
            missing = [pid for pid in ctx.arch_ids if pid not in ref]
            if missing:
                raise NasDoseError(f"diversity reference {k}: no prediction for architecture patient(s) "
                                   f"{', '.join(missing[:5])}")
            refs.append({pid: torch.as_tensor(ref[pid], dtype=torch.float32)[None] for pid in ctx.arch_ids})
        return refs

    def run(self, ctx: SearchContext) -> list[Candidate]:
        cfg = self.config
        result_path = ctx.state_path(RESULT)
        if result_path is not None and result_path.exists():
            return self._load_result(ctx, result_path)
        seed_everything(ctx.seed)
        supernet = Supernet(ctx.space, ctx.macro, mode=cfg.mode, tau=cfg.tau_start)
        wrapped = ctx.wrap(supernet)
        held = supernet if ctx.conditioning is None else wrapped  # what the checkpoint keeps
        net = ctx.runtime.prepare(wrapped)
        w_opt = make_optimizer(supernet.weight_parameters(wrapped), cfg.weight_optim)
        a_opt = make_optimizer(supernet.arch_parameters(), cfg.arch_optim)
        scalers = {"weight": ctx.runtime.grad_scaler(), "arch": ctx.runtime.grad_scaler()}
        refs = self._reference_tensors(ctx)
        self.history = [supernet.arch_weights()]
        ctx.events.arch_weights(0, self.history[0], ctx.space.slots())
        start = 0
        state_path = ctx.state_path(STATE)
        if state_path is not None and state_path.exists():
            state = load_checkpoint(state_path)
            self._check(state, ctx, state_path)
            held.load_state_dict(state["supernet"])
            w_opt.load_state_dict(state["weight_optim"])
            a_opt.load_state_dict(state["arch_optim"])
            for name, scaler in scalers.items():
                scaler.load_state_dict(state["scalers"][name])
            set_rng_state(state["rng"])
            self.history, start, self.hinge = state["history"], state["epoch"], state["hinge"]
            ctx.log({"event": "resume", "strategy": self.name, "epoch": start})
        for epoch in range(start, cfg.epochs):
            if ctx.should_stop():
                ctx.log({"event": "time_budget", "strategy": self.name, "epochs_done": epoch})
                break
            supernet.tau = tau_at(cfg, epoch)
            record = self._epoch(ctx, supernet, net, (w_opt, a_opt), scalers, refs, epoch)
            self.hinge += record.get("hinge", 0.0)
            self.history.append(supernet.arch_weights())
            tracked = self._track(ctx, supernet, net)
            ctx.log({**record, "arch_weights": self.history[-1], **tracked})
            ctx.events.scalars(epoch + 1, {key: record.get(key) for key in ("weight_loss", "arch_loss", "hinge", "tau")}
                               | {"score": tracked.get("score")})
            ctx.events.arch_weights(epoch + 1, self.history[-1], ctx.space.slots())
            if state_path is not None:
                save_checkpoint(state_path, {
                    "fingerprint": self._fingerprint(ctx), "epoch": epoch + 1, "supernet": held.state_dict(),
                    "weight_optim": w_opt.state_dict(), "arch_optim": a_opt.state_dict(),
                    "scalers": {k: s.state_dict() for k, s in scalers.items()}, "rng": rng_state(),
                    "history": self.history, "hinge": self.hinge})
        candidates = self._score(ctx, supernet, net)
        if result_path is not None:
            save_checkpoint(result_path, {
                "fingerprint": self._fingerprint(ctx), "history": self.history, "hinge": self.hinge,
                "candidates": [c.to_state() for c in candidates]})
        return candidates

    def _epoch(self, ctx: SearchContext, supernet: Supernet, net: torch.nn.Module,
               optims: tuple[torch.optim.Optimizer, torch.optim.Optimizer], scalers: dict[str, Any],
               refs: list[dict[str, torch.Tensor]], epoch: int) -> dict[str, Any]:
        """One epoch of alternating steps; returns its log record."""
        cfg = self.config
        w_opt, a_opt = optims
        search_arch = epoch >= cfg.warmup_epochs
        weight_batches = _batches(ctx, ctx.weight_ids, cfg.batch_size, _stream_seed(ctx.seed, epoch, 0))
        arch_batches = _batches(ctx, ctx.arch_ids, cfg.batch_size, _stream_seed(ctx.seed, epoch, 1))
        sums = {"weight_loss": 0.0, "arch_loss": 0.0, "hinge": 0.0}
        drawn: dict[str, list[list[str]]] = {"weight_batches": [], "arch_batches": []}
        net.train()
        for _ in progress(range(cfg.steps_per_epoch), desc=f"search epoch {epoch + 1}/{cfg.epochs}"):
            batch = next(weight_batches)
            drawn["weight_batches"].append(list(batch["id"]))
            loss, _ = self._step(ctx, net, batch, w_opt, scalers["weight"], supernet.weight_parameters(net),
                                 supernet.arch_parameters(), cfg.weight_optim.grad_clip, [])
            sums["weight_loss"] += loss
            if search_arch:
                batch = next(arch_batches)
                drawn["arch_batches"].append(list(batch["id"]))
                loss, hinge = self._step(ctx, net, batch, a_opt, scalers["arch"], supernet.arch_parameters(),
                                         supernet.weight_parameters(net), cfg.arch_optim.grad_clip, refs)
                sums["arch_loss"] += loss
                sums["hinge"] += hinge
        steps = cfg.steps_per_epoch
        if distributed.world_size() > 1:  # the whole batches' losses and ids, as one process logs them
            means = distributed.all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64), "mean")
            sums = dict(zip(sums, means.tolist()))
            drawn = {k: [distributed.gather_objects(ids) for ids in v] for k, v in drawn.items()}
        return {"event": "epoch", "strategy": self.name, "epoch": epoch + 1, "tau": supernet.tau,
                "weight_loss": sums["weight_loss"] / steps,
                **({"arch_loss": sums["arch_loss"] / steps, "hinge": sums["hinge"] / steps} if search_arch else {}),
                **drawn}

    def _step(self, ctx: SearchContext, net: torch.nn.Module, batch: dict[str, Any], opt: torch.optim.Optimizer,
              scaler: Any, params: list[torch.nn.Parameter], frozen: list[torch.nn.Parameter],
              grad_clip: float | None, refs: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """One update of `params` on masked L1 (+ the diversity hinge against `refs`); `frozen`
        get no gradients (the other half of the alternation). Distributed, the gradients of
        `params` are averaged over the ranks (not DDP, which cannot follow the alternation), with
        the loss weighted to be that of the whole batch; the hinge, a mean over samples, needs
        no weight as every rank has as many."""
        ids = list(batch["id"])
        batch = ctx.runtime.to_device(batch)
        for p in params:
            p.grad = None
        for p in frozen:
            p.requires_grad_(False)
        try:
            with ctx.runtime.autocast():
                pred = forward(net, batch)
            loss = masked_loss(pred, batch["target"], batch["mask"])
            if distributed.world_size() > 1:
                loss = loss * share_weight(batch["mask"])
            hinge = torch.zeros((), device=loss.device)
            for ref in refs:
                target = ctx.runtime.to_device(torch.stack([ref[pid] for pid in ids]))
                hinge = hinge + diversity_hinge(pred, target, batch["mask"], ctx.diversity.margin)
            total = loss + ctx.diversity.weight * hinge
            scaler.scale(total).backward()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        distributed.average_gradients(params)
        if grad_clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(opt)
        scaler.update()
        return float(total.detach()), float(hinge.detach())

    def _track(self, ctx: SearchContext, supernet: Supernet, net: torch.nn.Module) -> dict[str, Any]:
        """The strongest-op genotype now, and (track_score) its fixed-path score on the arch patients."""
        g = supernet.genotype()
        if not self.config.track_score:
            return {"genotype": g.to_dict()}
        supernet.fix(g)
        errors, _ = ctx.evaluate(net, ctx.arch_ids)
        supernet.fix(None)
        return {"genotype": g.to_dict(), "score": float(np.mean(list(errors.values())))}

    def _score(self, ctx: SearchContext, supernet: Supernet, net: torch.nn.Module) -> list[Candidate]:
        """Score the most probable genotypes by the supernet fixed to each (inherited weights)."""
        probs = supernet.arch_weights()
        # arch-patient predictions are kept only where a later search needs them as references
        kept = [*ctx.diversity_ids, *(ctx.arch_ids if ctx.diversity.mode == "sequential" else [])]
        ids = list(dict.fromkeys([*ctx.arch_ids, *ctx.diversity_ids]))
        ranked_by_alpha = most_probable(ctx.space, supernet.genotype(), probs, self.config.candidates)

        def candidate(g: Genotype) -> Candidate:
            supernet.fix(g)
            errors, predictions = ctx.evaluate(net, ids)
            return Candidate(g, float(np.mean([errors[pid] for pid in ctx.arch_ids])),
                             ctx.cost(ctx.wrap(ctx.space.build(g))),
                             {pid: predictions[pid].astype(np.float16) for pid in kept})

        # Independent of each other: spread over the ranks of a distributed search.
        candidates = distributed.map_shards(candidate, [g for g, _ in ranked_by_alpha])
        supernet.fix(None)
        for rank, ((g, logp), c) in enumerate(zip(ranked_by_alpha, candidates)):
            c.metrics = {"alpha_rank": float(rank), "log_prob": logp, **c.metrics}
            ctx.log({"event": "candidate", "strategy": self.name, "rank": rank, "genotype": g.to_dict(),
                     "score": c.score, **c.metrics})
        ranked = sorted(candidates, key=lambda c: c.score)
        if self.config.derive == "argmax":  # candidates[0] is the strongest-op genotype
            ranked.remove(candidates[0])
            ranked.insert(0, candidates[0])
        return ranked

    def _load_result(self, ctx: SearchContext, path: Any) -> list[Candidate]:
        """The candidates of a search that already finished (resume)."""
        state = load_checkpoint(path)
        self._check(state, ctx, path)
        self.history, self.hinge = state["history"], state["hinge"]
        return [Candidate.from_state(c, str(path)) for c in state["candidates"]]
