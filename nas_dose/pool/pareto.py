"""Accuracy against cost: the candidates no other beats on both, and the most accurate pool under
a cost budget. Cost is a candidate's `params`, `flops` or `latency_ms` metric (the evaluator
measures the first two always, the latency when the search asks for it)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from .candidate import Candidate

Cost = Literal["params", "flops", "latency"]
# The candidate metric of each cost, and how a figure labels it.
METRICS: dict[str, str] = {"params": "params", "flops": "flops", "latency": "latency_ms"}
LABELS: dict[str, str] = {"params": "parameters", "flops": "FLOPs", "latency": "latency (ms, batch 1)"}


def cost_of(c: Candidate, cost: Cost) -> float:
    """The candidate's `cost` (inf where it was not measured)."""
    return c.metrics.get(METRICS[cost], math.inf)


def pareto_front(cands: Sequence[Candidate], cost: Cost) -> list[int]:
    """Indices of the candidates with a finite score and cost that no other is at least as good as
    on both (lower score, lower cost) and better on one, by ascending cost."""
    usable = [i for i, c in enumerate(cands) if math.isfinite(c.score) and math.isfinite(cost_of(c, cost))]
    front = []
    for i in usable:
        si, ci = cands[i].score, cost_of(cands[i], cost)
        if not any((cands[j].score <= si and cost_of(cands[j], cost) <= ci)
                   and (cands[j].score < si or cost_of(cands[j], cost) < ci) for j in usable):
            front.append(i)
    return sorted(front, key=lambda i: (cost_of(cands[i], cost), cands[i].score))


def within_budget(cands: Sequence[Candidate], cost: Cost, budget: float | None) -> list[Candidate]:
    """The candidates whose cost is within `budget` (all when None): what a pool under a cost
    budget is chosen from."""
    if budget is None:
        return list(cands)
    return [c for c in cands if cost_of(c, cost) <= budget]


def front_record(cands: Sequence[Candidate], cost: Cost) -> dict[str, Any]:
    """The front as pool.yaml records it (each point's cost under its metric's name)."""
    metric = METRICS[cost]
    return {"cost": cost, "front": [{"genotype": cands[i].genotype.to_dict(), "search_score": float(cands[i].score),
                                     metric: float(cost_of(cands[i], cost))} for i in pareto_front(cands, cost)]}
