"""Strategy `evolution`: regularized (aging) evolution, and the resumable trial loop it shares
with random search.

Aging evolution (Real et al. 2019): the population is the P most recent children; each new
child mutates exactly one slot of the fittest of S members drawn at random, and the oldest
member dies, however good it was, so no lucky early score dominates the search. The first P
children are drawn at random. Fitness is −score; with pool diversity it adds λ × the mean
prediction disagreement to the current best `members` candidates, and with sequential
diversity it subtracts the LENAS hinge, weight × max(0, margin − disagreement), against
each reference network, so the search favours networks that err differently.

The budget counts distinct genotypes scored: a child that repeats a genotype joins the
population (as in the paper) but costs nothing, being cached. Every child is checkpointed
with the RNG state, so an interrupted search resumed continues exactly as if never stopped.

Distributed (torchrun), the P random first children are scored in parallel, one per rank; each
later child's tournament needs the score of the child before it, so they are scored one at a
time (batching them would be another algorithm, whose result would depend on the world size).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas_dose import distributed
from nas_dose.config import ConfigError, at_least, to_dict
from nas_dose.errors import NasDoseError
from nas_dose.io import load_checkpoint, save_checkpoint
from nas_dose.pool import Candidate
from nas_dose.pool.diversity import DiversityConfig, mean_disagreement
from nas_dose.search_spaces import Genotype, genotype_from_dict

from .base import SearchContext, register_strategy
from .evaluator import EvaluatorConfig, Scorer, ScoringStrategy, derived_seed, prediction_ids, ranked

STATE_FORMAT = "nasdose-trials"
# A search stops after PATIENCE × budget children even if fewer distinct genotypes were found
# (a space smaller than the budget, or a population stuck on cached genotypes).
PATIENCE = 10

Propose = Callable[[list[Candidate], np.random.RandomState], tuple[Genotype, int | None]]


def check_budget(budget: int) -> None:
    at_least("budget", budget, 1)


@dataclass
class PopulationConfig:
    """What the population-based strategies share: budget (distinct genotypes scored, or trials),
    population P, sample S (tournament size) and the candidate evaluator."""

    budget: int = 100
    population: int = 20
    sample: int = 5
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)

    def validate(self) -> None:
        check_budget(self.budget)
        if not 1 <= self.sample <= self.population:
            raise ConfigError(f"config key 'sample': must be in [1, population={self.population}], got {self.sample}")


@dataclass
class EvolutionConfig(PopulationConfig):
    """members: how many of the best candidates the pool-diversity bonus compares a candidate with."""

    members: int = 4

    def validate(self) -> None:
        at_least("population", self.population, 2)
        super().validate()
        at_least("members", self.members, 1)


def run_trials(ctx: SearchContext, scorer: Scorer, name: str, config: Any, propose: Propose,
               blind: Callable[[int], bool] = lambda child: False) -> list[Candidate]:
    """Propose, score and checkpoint children until `config.budget` distinct genotypes are scored.

    `propose(children, rng)` returns the next genotype and its parent's index (None if drawn
    at random). The state (children in birth order, RNG) is saved after each child under
    ``ctx.state_path(name + ".pt")`` and restored from there; the budget may be raised on resume.

    `blind(i)`: whether child i is proposed without looking at any score (evolution's random
    start, every child of random search). A distributed search proposes such children ahead and
    scores them together, one per rank; children, log and checkpoints are those of one process.
    """
    path = ctx.state_path(f"{name}.pt")
    rng = np.random.RandomState(derived_seed(ctx.seed, name))
    settings = {k: v for k, v in to_dict(config).items() if k != "budget"}
    children: list[Candidate] = []
    if path is not None and path.is_file():
        children = _restore(path, name, settings, ctx, scorer, rng)
    seen = {c.genotype.key() for c in children}
    while len(seen) < config.budget and len(children) < PATIENCE * config.budget and not ctx.should_stop():
        batch: list[tuple[Genotype, int | None, dict[str, Any]]] = []  # child, parent, RNG after it
        due = set(seen)  # the distinct genotypes once the batch is scored: the loop's own condition
        while not batch or (len(batch) < distributed.world_size() and blind(len(children) + len(batch))
                            and len(due) < config.budget and len(children) + len(batch) < PATIENCE * config.budget):
            g, parent = propose(children, rng)
            due.add(g.key())
            batch.append((g, parent, _rng_state(rng)))
        for (g, parent, state), cand in zip(batch, distributed.map_shards(scorer.score, [b[0] for b in batch])):
            new = g.key() not in seen
            seen.add(g.key())
            children.append(cand)
            ctx.log({"event": "child", "strategy": name, "child": len(children) - 1, "parent": parent,
                     "new": new, "score": cand.score, "distinct": len(seen)})
            if path is not None:
                save_checkpoint(path, {"format": STATE_FORMAT, "strategy": name, "settings": settings,
                                       "children": [c.genotype.to_dict() for c in children], "rng": state})
    return ranked(children)


def _restore(path: Path, name: str, settings: dict[str, Any], ctx: SearchContext, scorer: Scorer,
             rng: np.random.RandomState) -> list[Candidate]:
    state = load_checkpoint(path)
    if state.get("format") != STATE_FORMAT or state.get("strategy") != name:
        raise NasDoseError(f"{path}: not the state of a '{name}' search")
    if state["settings"] != settings:
        changed = sorted(k for k in set(settings) | set(state["settings"])
                         if settings.get(k) != state["settings"].get(k))
        raise NasDoseError(f"{path}: the search was started with other settings ({', '.join(changed)}); "
                           "resume it with its own config or use a new output folder")
    keys = state["rng"]
    rng.set_state(("MT19937", keys["keys"].numpy().astype(np.uint32), keys["pos"], keys["has_gauss"],
                   keys["cached_gaussian"]))
    return [scorer.score(genotype_from_dict(d, source=str(path))) for d in state["children"]]


def _rng_state(rng: np.random.RandomState) -> dict[str, Any]:
    """A RandomState's state as a tensor and plain values (a weights_only checkpoint)."""
    state = rng.get_state(legacy=False)
    return {"keys": torch.from_numpy(state["state"]["key"].astype(np.int64)), "pos": int(state["state"]["pos"]),
            "has_gauss": int(state["has_gauss"]), "cached_gaussian": float(state["gauss"])}


def fitness(c: Candidate, best: Sequence[Candidate], diversity: DiversityConfig,
            references: Sequence[dict[str, np.ndarray]], masks: dict[str, np.ndarray]) -> float:
    """−score; pool mode adds lam × mean disagreement to the other `best` candidates, sequential
    mode subtracts weight × the mean hinge max(0, margin − disagreement) to the references."""
    if diversity.mode == "none" or c.predictions is None:
        return -c.score
    if diversity.mode == "pool":
        return -c.score + diversity.lam * pool_disagreement(c, best, masks)
    if not references:
        return -c.score
    return -c.score - diversity.weight * float(np.mean(hinge_terms(c, references, diversity.margin, masks)))


def pool_disagreement(c: Candidate, best: Sequence[Candidate], masks: dict[str, np.ndarray]) -> float:
    """Mean prediction disagreement of `c` with the other `best` candidates that carry predictions
    (0 when `c` carries none or there is no other): how differently from the pool's likely
    members it errs."""
    others = [m.predictions for m in best if m.genotype.key() != c.genotype.key() and m.predictions is not None]
    return disagreement_to(c, others, masks)


def disagreement_to(c: Candidate, others: Sequence[dict[str, np.ndarray]], masks: dict[str, np.ndarray]) -> float:
    """Mean of `c`'s mean prediction disagreement with each of `others` (predictions by patient);
    0 when `c` carries no predictions or `others` is empty."""
    if c.predictions is None or not others:
        return 0.0
    return float(np.mean([mean_disagreement(c.predictions, o, masks) for o in others]))


def hinge_terms(c: Candidate, references: Sequence[dict[str, np.ndarray]], margin: float,
                masks: dict[str, np.ndarray]) -> list[float]:
    """max(0, margin − mean disagreement) of `c` to each reference (zeros when `c` carries no
    predictions): zero once `c` predicts at least `margin` away from that reference."""
    if c.predictions is None:
        return [0.0] * len(references)
    return [max(0.0, margin - mean_disagreement(c.predictions, r, masks)) for r in references]


@register_strategy("evolution")
class EvolutionStrategy(ScoringStrategy):
    """Regularized evolution (see the module docstring)."""

    Config = EvolutionConfig
    uses_references = True

    def run(self, ctx: SearchContext) -> list[Candidate]:
        cfg: EvolutionConfig = self.config
        scorer = self.make_scorer(ctx)
        masks: dict[str, np.ndarray] = {}

        def fit(c: Candidate, best: Sequence[Candidate]) -> float:
            if ctx.diversity.mode != "none" and c.predictions is not None and not masks:
                masks.update(prediction_masks(ctx))
            return fitness(c, best, ctx.diversity, ctx.references, masks)

        def propose(children: list[Candidate], rng: np.random.RandomState) -> tuple[Genotype, int | None]:
            if len(children) < cfg.population:
                return ctx.space.sample(rng, ctx.macro), None
            first = len(children) - cfg.population  # the population: the P most recent children
            drawn = first + rng.choice(cfg.population, size=cfg.sample, replace=False)
            best = ranked(children)[:cfg.members]
            parent = max(drawn, key=lambda i: (fit(children[i], best), i))  # ties: the youngest
            return ctx.space.mutate(children[parent].genotype, rng), int(parent)

        return run_trials(ctx, scorer, self.name, cfg, propose, blind=lambda child: child < cfg.population)


def prediction_masks(ctx: SearchContext) -> dict[str, np.ndarray]:
    """Possible-dose masks of the patients candidates carry predictions for."""
    return ctx.targets(prediction_ids(ctx))[1]
