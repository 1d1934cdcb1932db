"""Strategy `optuna`: Optuna's samplers (TPE, NSGA-II for several objectives, random) over
nasdose's spaces, scored by the same evaluator as `evolution`, `random` and `nni`.

A maintained engine beside NNI (NNI 3.0 has had no release since 2023 and no wheels off x86-64).
Each slot is one categorical parameter; a sample the space rejects is pruned (it counts against
the budget). `objectives` chooses what is minimized: the validation score alone, or with a cost
(`params`, `flops`, `latency`: see `SearchConfig.cost`) and pool diversity for a multi-objective
search whose trials trace an accuracy-cost(-diversity) front.

`diversity` (issue 17: accuracy, cost and pool diversity as objectives) is minimized as minus
the trial's mean prediction disagreement (`nas_dose.pool.diversity`) with what the pool has or
is likely to have, on the patients the evaluator keeps predictions for: with diversity.mode
sequential, with the references (the members found before this search: 0 for the first
search); with mode pool, with the other `members` most accurate candidates scored so far
(evolution's pool bonus, `pool_disagreement`). Unlike evolution's fixed trade-off (lam, the
hinge's weight), the sampler keeps the front; `nasdose search` then chooses the pool from the
candidates as for any strategy. It needs the candidates' predictions: refused before any
trial with diversity.mode none or without diversity patients, and when a scorer (a plugged-in
one) gives a candidate without them.

Resuming: the sampler is seeded and the study kept in memory, so a resumed search proposes the
same trials again and the evaluator's persisted cache answers those already scored: it ends
where an uninterrupted one ends. The finished study's trials are written beside the search's
state (optuna_trials.json) for inspection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from nas_dose.config import ConfigError, at_least
from nas_dose.errors import NasDoseError
from nas_dose.io import save_json
from nas_dose.pool import Candidate, DiversityConfig
from nas_dose.pool.pareto import cost_of

from .base import SearchContext, register_strategy
from .evaluator import ScoringStrategy, Trials, derived_seed, prediction_ids
from .evolution import PopulationConfig, disagreement_to, pool_disagreement, prediction_masks

Objective = Literal["score", "params", "flops", "latency", "diversity"]


@dataclass
class OptunaConfig(PopulationConfig):
    """sampler: tpe, nsga2 (several objectives) or random; budget: trials; population: NSGA-II's
    (`sample` is unused); objectives: what is minimized, the score first; members: how many of
    the best candidates the `diversity` objective compares a trial with (diversity.mode pool)."""

    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    objectives: tuple[Objective, ...] = ("score",)
    members: int = 4

    def validate(self) -> None:
        super().validate()
        at_least("members", self.members, 1)
        if not self.objectives or self.objectives[0] != "score" or len(set(self.objectives)) < len(self.objectives):
            raise ConfigError("config key 'objectives': 'score' first, then costs (params, flops, latency) "
                              "and diversity, each once")
        if len(self.objectives) > 1 and self.sampler == "tpe":
            raise ConfigError("config key 'sampler': several objectives need nsga2 (or random)")


def _sampler(cfg: OptunaConfig, seed: int) -> Any:
    import optuna  # optional: only a search that asks for this strategy needs it

    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.population, seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


@register_strategy("optuna")
class OptunaStrategy(ScoringStrategy):
    """Optuna's samplers (see the module docstring)."""

    Config = OptunaConfig

    @classmethod
    def check_diversity(cls, options: OptunaConfig, diversity: DiversityConfig) -> None:
        """Only the diversity objective heeds the references; it needs predictions, which mode none
        does not keep."""
        if "diversity" not in options.objectives:
            if diversity.mode == "sequential":
                raise NasDoseError(f"strategy '{cls.name}' cannot search against earlier members without "
                                   "the diversity objective; add it to options.objectives or use "
                                   "diversity.mode=pool or none")
        elif diversity.mode == "none":
            raise ConfigError("config key 'options.objectives': 'diversity' needs the candidates' predictions, "
                              "which diversity.mode none does not keep; set diversity.mode to pool or sequential")

    def run(self, ctx: SearchContext) -> list[Candidate]:
        import optuna  # as in _sampler

        slots, cfg = ctx.space.slots(), self.config
        self.check_diversity(cfg, ctx.diversity)
        if "diversity" in cfg.objectives and not prediction_ids(ctx):  # refused before any trial is scored
            raise ConfigError("config key 'options.objectives': 'diversity' needs the candidates' predictions on "
                              "the diversity patients (data.diversity_split), and this search has none")
        if "latency" in cfg.objectives:  # an objective: measured whatever the search's cost
            ctx = replace(ctx, measure_latency=True)
        trials = Trials(ctx, self.make_scorer(ctx), f"optuna-{cfg.sampler}")
        masks: dict[str, np.ndarray] = {}

        def diversity(cand: Candidate) -> float:
            """Minus the candidate's disagreement (the module docstring)."""
            if cand.predictions is None:
                if math.isfinite(cand.score):
                    raise ConfigError("config key 'options.objectives': 'diversity' needs the candidates' "
                                      "predictions; the evaluator's candidates carry none")
                return 0.0  # rejected over a limit: never chosen whatever its diversity
            if not masks:
                masks.update(prediction_masks(ctx))
            if ctx.diversity.mode == "sequential":
                return -disagreement_to(cand, ctx.references, masks)
            return -pool_disagreement(cand, trials.ranked()[:cfg.members], masks)

        def value(cand: Candidate, objective: Objective) -> float:
            if objective == "score":
                return cand.score
            return diversity(cand) if objective == "diversity" else cost_of(cand, objective)

        def objective(trial: optuna.Trial) -> float | tuple[float, ...]:
            choices = {slot: trial.suggest_categorical(slot, list(values)) for slot, values in slots.items()}
            try:
                genotype = ctx.space.genotype(choices, ctx.macro)
            except NasDoseError:
                raise optuna.TrialPruned() from None  # a combination the space rejects
            cand = trials.score(genotype)
            values = tuple(value(cand, o) for o in cfg.objectives)
            return values[0] if len(values) == 1 else values

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(directions=["minimize"] * len(cfg.objectives),
                                    sampler=_sampler(cfg, derived_seed(ctx.seed, "optuna", cfg.sampler)))
        study.optimize(objective, n_trials=cfg.budget,
                       callbacks=[lambda study, trial: study.stop() if ctx.should_stop() else None])
        record = ctx.state_path("optuna_trials.json")
        if record is not None:
            save_json(record, {"objectives": list(cfg.objectives), "trials": [
                {"number": t.number, "state": t.state.name, "params": t.params, "values": t.values}
                for t in study.trials]})
        return trials.ranked()
