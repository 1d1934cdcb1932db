"""Strategy `random`: the baseline every other strategy must beat on the same budget.

Each child is a uniform draw through the space's NNI mutable (`SearchSpace.sample`), scored
by the same evaluator, with the budget semantics (distinct genotypes scored) and the
resumable, checkpointed loop of `evolution`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nas_dose.pool import Candidate
from nas_dose.search_spaces import Genotype

from .base import SearchContext, register_strategy
from .evaluator import EvaluatorConfig, ScoringStrategy
from .evolution import check_budget, run_trials


@dataclass
class RandomConfig:
    """budget: distinct genotypes scored."""

    budget: int = 100
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)

    def validate(self) -> None:
        check_budget(self.budget)


@register_strategy("random")
class RandomStrategy(ScoringStrategy):
    """Random search (see the module docstring)."""

    Config = RandomConfig

    def run(self, ctx: SearchContext) -> list[Candidate]:
        def propose(children: list[Candidate], rng: np.random.RandomState) -> tuple[Genotype, int | None]:
            return ctx.space.sample(rng, ctx.macro), None

        return run_trials(ctx, self.make_scorer(ctx), self.name, self.config, propose, blind=lambda child: True)
