"""Accuracy against cost: the candidates no other beats on both, and the most accurate pool under
a cost budget. Cost is a candidate's `params`, `flops` or `latency_ms` metric (the evaluator
measures the first two always, the latency when the search asks for it). Where candidates carry
predictions, diversity is a third objective: a candidate's disagreement with the most accurate one."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from .candidate import Candidate
from .diversity import mean_disagreement

Cost = Literal["params", "flops", "latency"]
# The candidate metric of each cost, and how a figure labels it.
METRICS: dict[str, str] = {"params": "params", "flops": "flops", "latency": "latency_ms"}
LABELS: dict[str, str] = {"params": "parameters", "flops": "FLOPs", "latency": "latency (ms, batch 1)"}
# The third objective of the recorded front (where candidates carry predictions).
DIVERSITY = "mean prediction disagreement with the most accurate candidate on the diversity patients"


def cost_of(c: Candidate, cost: Cost) -> float:
    """The candidate's `cost` (inf where it was not measured)."""
    return c.metrics.get(METRICS[cost], math.inf)


def pareto_front(cands: Sequence[Candidate], cost: Cost, diversity: Sequence[float] | None = None) -> list[int]:
    """Indices of the candidates with a finite score and cost that no other is at least as good as
    on both (lower score, lower cost) and better on one, by ascending cost. With `diversity` (one
    value per candidate, higher is better; see `diversity_to_best`), a third objective."""
    def objectives(i: int) -> tuple[float, ...]:
        return (cands[i].score, cost_of(cands[i], cost), *(() if diversity is None else (-diversity[i],)))

    points = {i: objectives(i) for i in range(len(cands))}
    usable = [i for i, p in points.items() if all(math.isfinite(v) for v in p)]
    front = [i for i in usable
             if not any(all(a <= b for a, b in zip(points[j], points[i])) and points[j] != points[i] for j in usable)]
    return sorted(front, key=lambda i: (cost_of(cands[i], cost), cands[i].score))


def diversity_to_best(cands: Sequence[Candidate], masks: Mapping[str, np.ndarray]) -> list[float] | None:
    """Each candidate's mean prediction disagreement with the most accurate one (0 for itself; NaN
    without predictions): what it adds to a pool that, as every pool, starts with that one. None
    when some candidate with a finite score carries no predictions (a search without diversity)."""
    usable = [c for c in cands if math.isfinite(c.score)]
    if not usable or any(c.predictions is None for c in usable):
        return None
    best = min(usable, key=lambda c: c.score).predictions or {}
    return [math.nan if c.predictions is None else mean_disagreement(c.predictions, best, masks) for c in cands]


def within_budget(cands: Sequence[Candidate], cost: Cost, budget: float | None) -> list[Candidate]:
    """The candidates whose cost is within `budget` (all when None): what a pool under a cost
    budget is chosen from."""
    if budget is None:
        return list(cands)
    return [c for c in cands if cost_of(c, cost) <= budget]


def front_record(cands: Sequence[Candidate], cost: Cost, diversity: Sequence[float] | None = None) -> dict[str, Any]:
    """The front as pool.yaml records it (each point's cost under its metric's name) and, with
    `diversity` (`diversity_to_best`), the front of accuracy, cost and diversity."""
    metric = METRICS[cost]

    def point(i: int) -> dict[str, Any]:
        return {"genotype": cands[i].genotype.to_dict(), "search_score": float(cands[i].score),
                metric: float(cost_of(cands[i], cost))}

    record: dict[str, Any] = {"cost": cost, "front": [point(i) for i in pareto_front(cands, cost)]}
    if diversity is not None:
        record["diversity"] = DIVERSITY
        record["diversity_front"] = [{**point(i), "disagreement": float(diversity[i])}
                                     for i in pareto_front(cands, cost, diversity)]
    return record
