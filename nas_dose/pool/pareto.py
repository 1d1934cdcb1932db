"""Accuracy against cost: the candidates no other beats on both, and the most accurate pool under
a cost budget. Cost is a candidate's `params` or `flops` metric (the evaluator measures both)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from .candidate import Candidate

Cost = Literal["params", "flops"]


def pareto_front(cands: Sequence[Candidate], cost: Cost) -> list[int]:
    """Indices of the candidates with a finite score and cost that no other is at least as good as
    on both (lower score, lower cost) and better on one, by ascending cost."""
    usable = [i for i, c in enumerate(cands) if math.isfinite(c.score) and math.isfinite(c.metrics.get(cost, math.nan))]
    front = []
    for i in usable:
        si, ci = cands[i].score, cands[i].metrics[cost]
        if not any((cands[j].score <= si and cands[j].metrics[cost] <= ci)
                   and (cands[j].score < si or cands[j].metrics[cost] < ci) for j in usable):
            front.append(i)
    return sorted(front, key=lambda i: (cands[i].metrics[cost], cands[i].score))


def within_budget(cands: Sequence[Candidate], cost: Cost, budget: float | None) -> list[Candidate]:
    """The candidates whose cost is within `budget` (all when None): what a pool under a cost
    budget is chosen from."""
    if budget is None:
        return list(cands)
    return [c for c in cands if c.metrics.get(cost, math.inf) <= budget]


def front_record(cands: Sequence[Candidate], cost: Cost) -> dict[str, Any]:
    """The front as pool.yaml records it."""
    return {"cost": cost, "front": [{"genotype": cands[i].genotype.to_dict(), "search_score": float(cands[i].score),
                                     cost: float(cands[i].metrics[cost])} for i in pareto_front(cands, cost)]}
