"""How the multi-trial strategies (evolution, random, NNI) score a genotype, with a persisted cache.

Three modes, chosen in `EvaluatorConfig.mode`:

- ``inherit`` (SPOS, single-path one-shot): a supernet is trained once, each step on one path
  drawn uniformly over the op slots, on the weight patients; a genotype's score is its single
  path (`Supernet.fix`) with the shared weights on the architecture patients. Cheap per
  candidate; the ranking is a proxy for that of trained networks.
- ``train``: the genotype's own network is built and trained from scratch for `train_steps`
  on the weight patients, then scored on the architecture patients.
- ``finetune``: the genotype's own network starts from its inherited weights (those of its path
  in the supernet "inherit" trains, `Supernet.subnet_state_dict`, as an ensemble's `init:
  inherit` member does), is trained on for `finetune_steps` on the weight patients, then scored
  on the architecture patients: a few steps let each path leave the compromise the shared
  weights strike between all paths, far fewer than training from scratch needs.

The supernet mixes op slots only; a richer space's width and depth slots are fixed per
supernet. "inherit" and "finetune" keep one supernet per combination of those non-op slots,
each trained with the same `supernet_steps`, so that every score comes from the same kind of
proxy (mixing inherited and trained scores would rank candidates by how they were scored, not
by quality).

All modes train with the training engine's masked L1 loss (`nas_dose.training.masked_loss`) and
score with its dose score (through `SearchContext.evaluate`), on `ctx.weight_ids` and
`ctx.arch_ids`: not with `train_model`, which addresses patients by split name, whereas the
search trains and scores on disjoint patient subsets that need not be whole splits.

Scores are cached by `Genotype.key()`; with `ctx.shared_path`, each entry is its own file under
``evaluator/``, so a resumed search never re-scores (an entry named after an older form of the
key is found by the genotype it holds); the folder's settings.json holds the
EvaluatorConfig (mode and steps included), and a folder of other settings is refused, so scores
of different modes never mix. The trained supernets are kept in one file (SUPERNET_FILE,
`ctx.supernet_file`: `nasdose search` puts it in its run folder as DIR/supernet.pt): each with
the non-op slots it was trained for, beside the space, macro, steps, input shape and weight
patients they all share. A supernet in training is checkpointed every
CHECKPOINT_EVERY steps under ``evaluator/``, so an interrupted search resumes it where it stopped,
to the weights an uninterrupted one reaches.

The K searches of a sequential run share the evaluator's folder, its supernet file and its seed
(`ctx.shared_seed`): the supernet is trained once for them all and a genotype scored by one
search is a cache hit for the others (the score and predictions of the supernet fixed to it do
not depend on the search; the diversity hinge against a search's own references is computed
by that search from the predictions).

For conditioned networks (`search … conditioning=film`, `strategies/task.py`) the supernet is
conditioned as the final networks are (FiLM after every normalization layer of every candidate,
one preference embedding) and learns as conditioned training does: each step's patients on one
of their preference plans each, asked for its preferences; a genotype is scored on every plan of
the architecture patients, each asked for its own preferences. The file then keeps each
conditioned supernet whole (its embedding with it) and records the conditioning; the cache and
the file of a conditioned search and of a plain one are refused by each other.

`supernet: PATH` scores (or, in mode finetune, starts) with the supernets of an earlier
search's file instead of training any (for any scoring strategy; a file "inherit" trained serves
"finetune" and back). The file must match this search: space, macro, supernet_steps, sampling, the
networks' input (channels, grid), and no architecture patient among the patients it was trained
on; a genotype whose non-op slots it holds no supernet for is refused. Each refusal is one line
naming the file.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import re
import time
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from nas_dose.config import ConfigError, at_least, to_dict
from nas_dose.errors import NasDoseError
from nas_dose.io import load_checkpoint, load_json, save_checkpoint, save_json, shared_file
from nas_dose.models.conditioning import condition
from nas_dose.pool import Candidate
from nas_dose.progress import progress
from nas_dose.runtime import rng_state, seed_everything, set_rng_state
from nas_dose.search_spaces import Genotype, Supernet, genotype_from_dict, get_space
from nas_dose.training import OptimConfig, masked_loss
from nas_dose.training.engine import forward
from nas_dose.training.optimization import make_optimizer

from .base import SearchContext, Strategy

CACHE_FORMAT = "nasdose-evaluator"
CACHE_VERSION = 1
CHECKPOINT_EVERY = 100  # supernet steps between checkpoints (the pipeline's 1,000 take minutes on a CPU)
SUPERNET_FORMAT = "nasdose-supernets"
SUPERNET_FILE = "supernet.pt"  # the trained supernets of a search's evaluator (`evaluator.supernet`)
SlotKey = tuple[tuple[str, Any], ...]  # a supernet's non-op slots and their values, sorted
ENTRY_NAME = re.compile(r"[0-9a-f]{16}")  # a cache entry's file name: `_digest` of its genotype's key
RECORD_DEFAULTS = {"sampling": "uniform"}  # what a supernet file written before the key was made with


@dataclass
class EvaluatorConfig:
    """Scoring options; `supernet_steps` for "inherit" and "finetune", `train_steps` for "train",
    `finetune_steps` for "finetune". `max_params`, `max_flops` (a forward pass at the data set's
    grid) and `max_latency_ms` (that pass measured on the search's device, batch 1) are hard
    constraints: a genotype over one is rejected before any training, its score infinite (never
    chosen for a pool). Latency is measured only when limited
    or when it is the search's cost, and only for a genotype within the other two limits.
    `supernet`: an earlier search's supernet file (its DIR/supernet.pt) to score with instead of
    training one ("inherit" and "finetune"; see the module docstring); relative to the working
    directory, and recorded absolute by `nasdose search`. `sampling`: how the supernet draws its
    single path each step, "uniform" (SPOS: every op slot at random) or "fair" (FairNAS's strict
    fairness, Chu et al. 2019: each op slot goes through a fresh random order of all its ops, so
    every op is trained equally often and none is favoured by the luck of the draws)."""

    mode: Literal["inherit", "train", "finetune"] = "inherit"
    supernet_steps: int = 1000
    train_steps: int = 200
    finetune_steps: int = 50
    batch_size: int = 1
    lr: float = 1e-3
    max_params: int | None = None
    max_flops: float | None = None
    max_latency_ms: float | None = None
    supernet: str | None = None
    sampling: Literal["uniform", "fair"] = "uniform"

    def validate(self) -> None:
        if self.supernet is not None and self.mode == "train":
            raise ConfigError("config key 'evaluator.supernet': mode train uses no supernet (inherit and finetune do)")
        for key in ("max_params", "max_flops"):
            if getattr(self, key) is not None:
                at_least(f"evaluator.{key}", getattr(self, key), 1)
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise ConfigError(f"config key 'evaluator.max_latency_ms': must be positive, got {self.max_latency_ms}")
        for key in ("supernet_steps", "train_steps", "finetune_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'evaluator.{key}': must be at least 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"config key 'evaluator.lr': must be positive, got {self.lr}")


class Scorer(Protocol):
    """What a strategy needs from an evaluator (tests plug in cheap fakes)."""

    def score(self, g: Genotype) -> Candidate: ...


ScorerFactory = Callable[[SearchContext], Scorer]


class ScoringStrategy(Strategy):
    """A strategy that scores genotypes one by one (evolution, random, NNI); its config has an
    `evaluator` section. `scorer` replaces the CandidateEvaluator (tests plug in cheap fakes)."""

    searches_stages = True

    predictions_from = ("the evaluator's networks (mode inherit: the SPOS supernet fixed to each genotype; "
                        "mode train: each genotype trained briefly from scratch; mode finetune: each genotype "
                        "trained briefly from its supernet weights)")

    def __init__(self, config: Any, scorer: ScorerFactory | None = None) -> None:
        super().__init__(config)
        self.scorer = scorer

    def make_scorer(self, ctx: SearchContext) -> Scorer:
        return self.scorer(ctx) if self.scorer is not None else CandidateEvaluator(ctx, self.config.evaluator)


class Trials:
    """A strategy driven by an outside engine (NNI, Optuna): its trials scored in order, each
    logged; `ranked()` gives the strategy's result."""

    def __init__(self, ctx: SearchContext, scorer: Scorer, strategy: str) -> None:
        self.ctx, self.scorer, self.strategy = ctx, scorer, strategy
        self.found: list[Candidate] = []

    def score(self, g: Genotype) -> Candidate:
        cand = self.scorer.score(g)
        self.found.append(cand)
        self.ctx.log({"event": "trial", "strategy": self.strategy, "trial": len(self.found) - 1, "score": cand.score})
        return cand

    def ranked(self) -> list[Candidate]:
        return ranked(self.found)


def ranked(cands: Iterable[Candidate]) -> list[Candidate]:
    """Distinct genotypes (first kept), best (lowest finite score) first; ties keep their order."""
    seen: dict[Hashable, Candidate] = {}
    for c in cands:
        seen.setdefault(c.genotype.key(), c)
    return sorted(seen.values(), key=lambda c: c.score if math.isfinite(c.score) else math.inf)


def prediction_ids(ctx: SearchContext) -> list[str]:
    """Patients whose predictions a candidate carries (float16, dose / 70): none without
    diversity; the diversity patients; in sequential mode also the architecture patients, on
    which later searches measure their hinge against this candidate."""
    if ctx.diversity.mode == "none":
        return []
    extra = ctx.arch_ids if ctx.diversity.mode == "sequential" else []
    return list(dict.fromkeys([*ctx.diversity_ids, *extra]))


def random_path(supernet: Supernet, rng: np.random.RandomState) -> Genotype:
    """A uniformly drawn single path of `supernet` (SPOS): random op slots, its fixed slots kept."""
    g = supernet.space.sample(rng, supernet.macro)
    return Genotype(g.space, g.version, {**g.choices, **supernet.fixed}, g.macro)


class FairPaths:
    """Single paths of `supernet` under strict fairness: each op slot takes its ops in a random
    order, a fresh one each time the last is used up, so after any multiple of a slot's op count
    every op of it has been trained equally often (its fixed slots kept)."""

    def __init__(self, supernet: Supernet, rng: np.random.RandomState) -> None:
        self.supernet, self.rng = supernet, rng
        slots = supernet.space.slots()
        self.ops = {s: slots[s] for s in supernet.space.op_slots()}
        self.queues: dict[str, list[Any]] = {s: [] for s in self.ops}

    def __call__(self) -> Genotype:
        for slot, queue in self.queues.items():
            if not queue:
                queue.extend(self.ops[slot][i] for i in self.rng.permutation(len(self.ops[slot])))
        g = random_path(self.supernet, self.rng)  # the non-op slots, as SPOS draws them
        return Genotype(g.space, g.version, {**g.choices, **{s: q.pop(0) for s, q in self.queues.items()},
                                             **self.supernet.fixed}, g.macro)


def derived_seed(seed: int, *parts: Any) -> int:
    """A 32-bit seed from the search seed and a stable description of what it is for."""
    return int(np.random.SeedSequence([seed, zlib.crc32(repr(parts).encode())]).generate_state(1)[0])


def _digest(value: Any) -> str:
    return hashlib.sha1(repr(value).encode()).hexdigest()[:16]


def read_supernets(path: Path) -> dict[str, Any]:
    """The contents of supernet file `path`, its tensors in host memory (a search holds every
    supernet of the file, and puts on the device only those it runs); refused in one line naming
    it when it is not one."""
    state = load_checkpoint(path, map_location="cpu")
    if state.get("format") != SUPERNET_FORMAT:
        raise NasDoseError(f"{path}: not a nasdose supernet file (a search's supernet.pt)")
    return state


def path_weights(wrapped: nn.Module, supernet: Supernet, g: Genotype) -> dict[str, torch.Tensor]:
    """The weights of `g`'s own network, wrapped as `wrapped` wraps `supernet` (a task's `wrap`),
    in `wrapped`: the wrapper's own (a conditioned network's embedding) and those of g's path
    (`Supernet.subnet_state_dict`), which map one to one onto the built network's."""
    if wrapped is supernet:
        return supernet.subnet_state_dict(g)
    prefix = next(name for name, m in wrapped.named_modules() if m is supernet) + "."
    own = {k: v for k, v in wrapped.state_dict().items() if not k.startswith(prefix)}
    return {**own, **{prefix + k: v for k, v in supernet.subnet_state_dict(g).items()}}


def inherited_weights(path: Path, g: Genotype, conditioning: dict[str, Any] | None = None
                      ) -> dict[str, torch.Tensor]:
    """The weights of `g`'s own network (`SearchSpace.build(g)`, plain torch.nn, or conditioned
    as `conditioning` says) in supernet file `path` (a search's supernet.pt): its supernet for
    g's non-op slots, fixed to g, whose path's parameters map one to one onto the built
    network's (`path_weights`), so that both compute the same function. Refused in one line
    naming the file when it holds none for g, or when its supernets are conditioned otherwise."""
    state = read_supernets(path)
    if state.get("conditioning") != conditioning:
        raise NasDoseError(f"{path}: supernets conditioned as {state.get('conditioning')}; the network is "
                           f"conditioned as {conditioning}")
    space = get_space(g.space)
    if state["space"] != g.space or state["macro"] != space.check_macro(g.macro, str(path)):
        raise NasDoseError(f"{path}: supernets of space {state['space']}, macro {state['macro']}; the genotype is "
                           f"of space {g.space}, macro {g.macro}")
    ops = set(space.op_slots())
    fixed = {s: v for s, v in sorted(g.choices.items()) if s not in ops}
    entry = next((e for e in state["supernets"] if e["fixed"] == fixed), None)
    if entry is None:
        raise NasDoseError(f"{path}: holds no supernet for {', '.join(f'{s}={v}' for s, v in fixed.items())}")
    supernet = Supernet(space, state["macro"], fixed)
    held = supernet if conditioning is None else condition(supernet, conditioning)
    held.load_state_dict(entry["model"])
    return path_weights(held, supernet, g)


def latency_device(device: torch.device) -> str:
    """The kind of device latencies are measured on: its model for a GPU, without the index that
    differs between the ranks of a distributed search (each on its own GPU), or "cpu"."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


class CandidateEvaluator:
    """Scores genotypes of `ctx.space` as set out in the module docstring; see `score`."""

    def __init__(self, ctx: SearchContext, cfg: EvaluatorConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.space = ctx.space
        self.macro = ctx.space.check_macro(ctx.macro, "search macro")
        self.scored = 0  # genotypes this object scored itself (cache misses)
        self.kept = prediction_ids(ctx)
        self.latency = ctx.measure_latency or cfg.max_latency_ms is not None  # measured per genotype
        self._cache: dict[Hashable, Candidate] = {}
        self._supernets: dict[SlotKey, tuple[Supernet, nn.Module]] = {}
        self._scoring_nets: dict[SlotKey, nn.Module] = {}  # mode inherit's: each supernet as the task runs it
        self._op_slots = set(self.space.op_slots())
        self.seed = ctx.shared_seed
        folder = ctx.shared_path("evaluator")
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self._check_settings(folder / "settings.json")
        # where the trained supernets are read from (and, unless given, written to)
        self.supernet_file = (Path(cfg.supernet) if cfg.supernet is not None else ctx.supernet_file
                              or (None if folder is None else folder / SUPERNET_FILE))
        self._trained: dict[SlotKey, dict[str, torch.Tensor]] | None = None  # the file's, once read
        self._by_genotype: dict[Hashable, Path] | None = None  # the cache entries by genotype, once read
        if cfg.supernet is not None:
            self._saved_supernets()  # refused before any work if it does not match

    # -- public --------------------------------------------------------------------------------

    def score(self, g: Genotype) -> Candidate:
        """The candidate of `g`: from the cache (memory, then disk) or scored now and cached."""
        key = g.key()
        if key in self._cache:
            return self._cache[key]
        cand = self._load(g)
        if cand is None:
            cand = self._score(g)
            self.scored += 1
            self.ctx.log({"event": "scored", "mode": self.cfg.mode, "genotype": g.to_dict(),
                          "score": cand.score, **cand.metrics})
            self._save(cand)
        self._cache[key] = cand
        return cand

    # -- scoring -------------------------------------------------------------------------------

    def _score(self, g: Genotype) -> Candidate:
        self.space.validate(g, "candidate")
        if g.macro != self.macro:
            raise NasDoseError(f"candidate: genotype macro {g.macro} differs from the search macro {self.macro}")
        started = time.perf_counter()
        final = self._final_network(g)
        cost = self.ctx.cost(final, latency=False)
        over = self._over(cost)
        if not over and self.latency:  # measured only for a genotype within the cheap limits
            cost["latency_ms"] = self.ctx.latency_ms(final)
            over = self._over(cost)
        if over:
            return Candidate(g, math.inf, {**cost, "rejected": 1.0, "seconds": round(time.perf_counter() - started, 3)})
        if self.cfg.mode == "inherit":
            net = self._scoring_net(g)
            self._supernet(g)[0].fix(g)
        else:
            steps = self.cfg.train_steps
            if self.cfg.mode == "finetune":
                supernet, wrapped = self._supernet(g)
                final.load_state_dict(path_weights(wrapped, supernet, g))
                steps = self.cfg.finetune_steps
                # the supernet may have been trained just now, drawing from the global RNGs
                seed_everything(derived_seed(self.seed, "finetune", g.key()))
            net = self.ctx.runtime.prepare(final)
            self._fit(net, final.parameters(), steps, derived_seed(self.seed, self.cfg.mode, g.key()), desc="candidate")
        errors, preds = self.ctx.evaluate(net, dict.fromkeys([*self.ctx.arch_ids, *self.kept]))
        score = float(np.mean([errors[pid] for pid in self.ctx.arch_ids]))
        predictions = {pid: preds[pid].astype(np.float16) for pid in self.kept} if self.kept else None
        metrics = {**cost, "seconds": round(time.perf_counter() - started, 3)}
        return Candidate(g, score, metrics, predictions)

    def _over(self, cost: dict[str, float]) -> list[str]:
        """The hard limits `cost` exceeds."""
        limits = {"params": self.cfg.max_params, "flops": self.cfg.max_flops, "latency_ms": self.cfg.max_latency_ms}
        return [k for k, limit in limits.items() if limit is not None and cost.get(k, -math.inf) > limit]

    def _final_network(self, g: Genotype) -> nn.Module:
        """`g`'s own network as the task runs it (`ctx.wrap`), seeded by `g` so that "train"
        results do not depend on the order."""
        seed_everything(derived_seed(self.seed, "init", g.key()))
        return self.ctx.wrap(self.space.build(g))

    def _fixed(self, g: Genotype) -> dict[str, Any]:
        """The non-op slots of `g`: what a supernet cannot mix."""
        return {s: v for s, v in sorted(g.choices.items()) if s not in self._op_slots}

    def _scoring_net(self, g: Genotype) -> nn.Module:
        """The supernet for `g`'s non-op slots as the task runs it on the device (`ctx.wrap`,
        `runtime.prepare`, once): what mode inherit scores with. Mode finetune only copies a path's
        weights out of a supernet, so it prepares one only to train it."""
        key = tuple(self._fixed(g).items())
        wrapped = self._supernet(g)[1]
        if key not in self._scoring_nets:
            self._scoring_nets[key] = self.ctx.runtime.prepare(wrapped)
        return self._scoring_nets[key]

    def _supernet(self, g: Genotype) -> tuple[Supernet, nn.Module]:
        """The trained supernet for `g`'s non-op slots (loaded, or trained now), and it as the task
        runs it (`ctx.wrap`, on the CPU until prepared)."""
        fixed = self._fixed(g)
        key = tuple(fixed.items())
        if key in self._supernets:
            return self._supernets[key]
        seed = derived_seed(self.seed, "supernet", key)
        seed_everything(seed)
        supernet = Supernet(self.space, self.macro, fixed)
        wrapped = self.ctx.wrap(supernet)  # before loading: a cascade's Refiner zeroes the last conv it wraps
        held = supernet if self.ctx.conditioning is None else wrapped  # what the file keeps
        saved = self._saved_supernets().get(key)
        if saved is not None:
            held.load_state_dict(saved)
        elif self.cfg.supernet is not None:
            raise NasDoseError(f"{self.supernet_file}: holds no supernet for "
                               f"{', '.join(f'{s}={v}' for s, v in fixed.items())} (it was not trained for "
                               "them); search without evaluator.supernet")
        else:
            net = self.ctx.runtime.prepare(wrapped)
            if self.cfg.mode == "inherit":  # scored with next: prepared (and compiled) once
                self._scoring_nets[key] = net
            rng = np.random.RandomState(seed)
            draw: Callable[[], Genotype] = (FairPaths(supernet, rng) if self.cfg.sampling == "fair"
                                            else lambda: random_path(supernet, rng))
            partial = self.folder / f"supernet-{_digest(key)}.partial.pt" if self.folder is not None else None
            self._fit(net, supernet.weight_parameters(wrapped), self.cfg.supernet_steps, seed,
                      desc="supernet", before_step=lambda: supernet.fix(draw()),
                      checkpoint=None if partial is None else (partial, held))
            self._store(key, {k: v.cpu() for k, v in held.state_dict().items()})
            if partial is not None:
                partial.unlink(missing_ok=True)
        self._supernets[key] = (supernet, wrapped)
        return supernet, wrapped

    def _supernet_record(self) -> dict[str, Any]:
        """What every supernet in the file shares with this search (checked on reading)."""
        shape = self.ctx.input_shape()
        return {"space": self.space.name, "macro": self.macro, "steps": self.cfg.supernet_steps,
                "sampling": self.cfg.sampling, "input": {"channels": shape[1], "grid": shape[2]},
                "conditioning": self.ctx.conditioning}

    def _saved_supernets(self) -> dict[SlotKey, dict[str, torch.Tensor]]:
        """The trained supernets of the file, by non-op slots (none without a file); a file that
        does not match this search is refused (see the module docstring)."""
        if self._trained is not None:
            return self._trained
        path = self.supernet_file
        self._trained = {}
        if path is None or not (path.is_file() or self.cfg.supernet is not None):
            return self._trained
        state = read_supernets(path)
        expected = self._supernet_record()
        changed = [f"{k} {state.get(k, RECORD_DEFAULTS.get(k))} (this search: {v})" for k, v in expected.items()
                   if state.get(k, RECORD_DEFAULTS.get(k)) != v]
        if changed:
            raise NasDoseError(f"{path}: supernets of another search: {'; '.join(changed)}")
        seen = sorted(set(state["weight_ids"]) & set(self.ctx.arch_ids))
        if seen:
            raise NasDoseError(f"{path}: its supernets were trained on patient(s) {', '.join(seen[:5])}, which "
                               "this search scores architectures on")
        self._trained = {tuple(sorted(e["fixed"].items())): e["model"] for e in state["supernets"]}
        return self._trained

    def _store(self, key: SlotKey, model: dict[str, torch.Tensor]) -> None:
        """Add a trained supernet to the file (written whole, atomically). The ranks of a
        distributed search score genotypes side by side and add to one file: under its lock,
        what the others stored since this evaluator read it is merged in, not written over."""
        trained = self._saved_supernets()
        trained[key] = model
        if self.supernet_file is None:
            return
        with shared_file(self.supernet_file):
            if self.supernet_file.is_file():
                for e in read_supernets(self.supernet_file)["supernets"]:
                    trained.setdefault(tuple(sorted(e["fixed"].items())), e["model"])
            save_checkpoint(self.supernet_file, {
                "format": SUPERNET_FORMAT, **self._supernet_record(), "weight_ids": list(self.ctx.weight_ids),
                "supernets": [{"fixed": dict(k), "model": m} for k, m in trained.items()]})

    def _fit(self, net: nn.Module, params: Iterable[nn.Parameter], steps: int, seed: int, desc: str,
             before_step: Callable[[], None] | None = None,
             checkpoint: tuple[Path, nn.Module] | None = None) -> None:
        """`steps` Adam steps of `params` on the masked L1 loss of `net` on weight-patient batches.

        `checkpoint` (a file, the module whose weights it keeps): saved every CHECKPOINT_EVERY
        steps and, when present, continued from; `before_step` is replayed for the steps done,
        so the draws it makes (a supernet's paths) go on as in an uninterrupted run.
        """
        runtime = self.ctx.runtime
        optimizer = make_optimizer(params, OptimConfig(lr=self.cfg.lr))
        scaler = runtime.grad_scaler()
        net.train()
        loss_sum = torch.zeros((), device=runtime.device)
        start = 0
        if checkpoint is not None and checkpoint[0].is_file():
            state = load_checkpoint(checkpoint[0], map_location=runtime.device)
            checkpoint[1].load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            loss_sum += state["loss_sum"]
            set_rng_state(state["rng"])
            start = state["step"]
            for _ in range(start):
                if before_step is not None:
                    before_step()
        for step, batch in zip(progress(range(start, steps), desc=desc), self._batches(seed, start)):
            if before_step is not None:
                before_step()
            batch = runtime.to_device(batch)
            with runtime.autocast():
                pred = forward(net, batch)
            loss = masked_loss(pred, batch["target"], batch["mask"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            if checkpoint is not None and (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < steps:
                save_checkpoint(checkpoint[0], {
                    "step": step + 1, "model": checkpoint[1].state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "loss_sum": loss_sum.cpu(), "rng": rng_state()})
        if not math.isfinite(loss_sum.item()):
            raise NasDoseError(f"{desc} training diverged (loss {loss_sum.item()}); try a lower evaluator.lr")

    def _batches(self, seed: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """Shuffled weight-patient batches from batch `start` on, pass after pass, each pass's
        order drawn from (seed, pass): the same stream whether a training was resumed or not."""
        for epoch in itertools.count():
            pass_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
            loader = self.ctx.loader(self.ctx.weight_ids, train=True, batch_size=self.cfg.batch_size,
                                     seed=pass_seed)
            if start >= len(loader):  # a pass done before the checkpoint: not read again
                start -= len(loader)
                continue
            yield from itertools.islice(loader, start, None)
            start = 0

    # -- persistence ---------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        ctx = self.ctx
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "space": self.space.name,
                "macro": self.macro, "seed": self.seed, "evaluator": self._evaluator_settings(),
                "data": str(Path(ctx.data).resolve()), "weight_ids": list(ctx.weight_ids),
                "arch_ids": list(ctx.arch_ids), "prediction_ids": self.kept, "cascade": ctx.cascade,
                "conditioning": ctx.conditioning,
                # latencies are only comparable on one kind of device
                **({"latency_on": latency_device(ctx.runtime.device)} if self.latency else {})}

    def _evaluator_settings(self) -> dict[str, Any]:
        """The EvaluatorConfig the scores depend on: `finetune_steps` only in mode finetune and
        `sampling` only when fair, so that the caches written before they existed stay valid."""
        out = to_dict(self.cfg)
        if self.cfg.mode != "finetune":
            del out["finetune_steps"]
        if self.cfg.sampling == "uniform":
            del out["sampling"]
        return out

    def _check_settings(self, path: Path) -> None:
        """Cached scores are only reused under the settings that produced them."""
        settings = self._settings()
        if not path.is_file():
            save_json(path, settings)
            return
        old = load_json(path)
        if not isinstance(old, dict) or old.get("format") != CACHE_FORMAT:
            raise NasDoseError(f"{path}: not a nasdose evaluator cache")
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise NasDoseError(f"{path}: the cached scores were made with other settings "
                               f"({', '.join(changed)}); use a new output folder")

    def _entry_path(self, g: Genotype) -> Path | None:
        return None if self.folder is None else self.folder / f"{_digest(g.key())}.pt"

    def _save(self, c: Candidate) -> None:
        path = self._entry_path(c.genotype)
        if path is not None:
            save_checkpoint(path, c.to_state())

    def _load(self, g: Genotype) -> Candidate | None:
        path = self._entry_path(g)
        if path is None:
            return None
        if not path.is_file():
            return self._load_renamed(path.parent, g)
        cand = Candidate.from_state(load_checkpoint(path), str(path))
        if cand.genotype.key() != g.key():
            raise NasDoseError(f"{path}: cache entry of another genotype")
        return cand

    def _load_renamed(self, folder: Path, g: Genotype) -> Candidate | None:
        """`g`'s entry under a name an older nasdose gave it, or None. An entry is named after its
        genotype's key, whose form has changed (lenas_levels genotypes were not canonical: the
        cells beyond the depth kept random values), so the entries are also found by the genotype
        they hold, read once on the first miss; a found one is saved under its current name."""
        if self._by_genotype is None:
            self._by_genotype = {}
            for path in sorted(folder.glob("*.pt")):
                if ENTRY_NAME.fullmatch(path.stem):
                    state = load_checkpoint(path, mmap=True)  # the genotype only: predictions stay on disk
                    self._by_genotype.setdefault(genotype_from_dict(state["genotype"], str(path)).key(), path)
        found = self._by_genotype.get(g.key())
        if found is None:
            return None
        cand = Candidate.from_state(load_checkpoint(found), str(found))
        self._save(cand)
        return cand
