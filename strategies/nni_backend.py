"""Strategy `nni`: NNI 3.0's own multi-trial strategies (Random, GridSearch, RegularizedEvolution,
TPE) over nasdose's spaces, scored by the same evaluator as `evolution` and `random`.

NNI is driven directly: a `SequentialExecutionEngine` runs each trial in this process and a
plain-function `FunctionalEvaluator` scores it, `strategy.initialize(space, engine);
strategy.run()`. No `NasExperiment`, so nothing is written to `$HOME` (it writes
``~/nni-experiments``) and no server is started (its default engine starts one).

The space NNI explores is the space's `MutableDict` of `Categorical`s (one per slot), wrapped
in a thin model space whose frozen form is the dict of choices; a sample is accepted only if
it also makes a valid nasdose genotype (a space may reject combinations). Three NNI 3.0 quirks
are worked around here: `RawFormatModelSpace` keeps a weak reference to the frozen model (a
plain dict has none); `Mutable.grid` reuses one sample dict for every grid point, so `freeze`
copies the sample; and that grid ends at the first invalid point, so the grid skips them.

NNI maximizes the metric, so a trial reports −score. TPE works on nasdose's spaces (they are
all `Categorical`s; NNI's TPE fails on `InputChoice`, which nasdose does not use), but unlike
NNI's other strategies it cannot draw again when a space rejects a combination: that ends the
search with an error. It sleeps one second per trial inside NNI. Resuming: NNI's strategies do
not restore their history, but every strategy here is seeded, so a resumed search proposes the
same trials again and the evaluator's persisted cache answers those already scored. Budget: at
most `budget` trials (the NNI strategies deduplicate, so trials are distinct genotypes).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from nas_dose.config import ConfigError
from nas_dose.errors import NasDoseError
from nas_dose.pool import Candidate
from nas_dose.search_spaces import SearchSpace

from .base import SearchContext, register_strategy
from .evaluator import ScoringStrategy, Trials, derived_seed
from .evolution import PopulationConfig


@dataclass
class NniConfig(PopulationConfig):
    """algorithm: which NNI strategy; budget: most trials. population, sample and mutation_prob
    (per-slot probability) are RegularizedEvolution's."""

    algorithm: Literal["random", "grid", "evolution", "tpe"] = "tpe"
    mutation_prob: float = 0.2

    def validate(self) -> None:
        super().validate()
        if not 0 < self.mutation_prob <= 1:
            raise ConfigError(f"config key 'mutation_prob': must be in (0, 1], got {self.mutation_prob}")


def _nni_strategy(cfg: NniConfig, seed: int) -> Any:
    from nni.nas import strategy  # NNI (heavy, optional) is imported only when a search uses it

    if cfg.algorithm == "random":
        return strategy.Random(seed=seed)
    if cfg.algorithm == "grid":
        return strategy.GridSearch(seed=seed)
    if cfg.algorithm == "evolution":
        return strategy.RegularizedEvolution(population_size=cfg.population, sample_size=cfg.sample,
                                             mutation_prob=cfg.mutation_prob, seed=seed)
    return strategy.TPE(optimize_mode="maximize", seed=seed)


@contextlib.contextmanager
def _quiet_nni() -> Iterator[None]:
    """NNI logs every trial at INFO level to stdout; keep only its warnings and errors."""
    logger = logging.getLogger("nni")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def drive(space: SearchSpace, cfg: NniConfig, seed: int, trial: Callable[[dict[str, Any]], float],
          stop: Callable[[], bool] = lambda: False) -> list[dict[str, Any]]:
    """Run NNI strategy `cfg.algorithm` for at most `cfg.budget` trials; return the samples tried.

    `trial(choices)` gets a validated sample (slot -> value) and returns its score (lower is
    better); `stop()` true ends the search before the next trial.
    """
    import nni  # as in _nni_strategy
    from nni.mutable.exception import SampleValidationError
    from nni.nas.evaluator import FunctionalEvaluator
    from nni.nas.execution import SequentialExecutionEngine
    from nni.nas.space import BaseModelSpace, RawFormatModelSpace

    class Choices(dict):
        """A frozen sample: a dict that NNI can hold a weak reference to."""

    class Space(BaseModelSpace):
        """The slots' MutableDict; valid samples must also be valid genotypes."""

        def __init__(self) -> None:
            self.mutables = space.mutable()

        def leaf_mutables(self, is_leaf: Callable[[Any], bool]) -> Iterable[Any]:
            yield from self.mutables.leaf_mutables(is_leaf)

        def check_contains(self, sample: dict[str, Any]) -> SampleValidationError | None:
            error = self.mutables.check_contains(sample)
            if error is not None:
                return error
            try:
                space.genotype({s: sample[s] for s in self.mutables})
            except NasDoseError as e:
                return SampleValidationError(str(e))
            return None

        def freeze(self, sample: dict[str, Any]) -> Choices:
            return Choices(self.mutables.freeze(sample))

    class ModelSpace(RawFormatModelSpace):
        def freeze(self, sample: dict[str, Any]) -> RawFormatModelSpace:
            return super().freeze(dict(sample))

        def grid(self, memo: dict[str, Any] | None = None, granularity: int | None = None) -> Iterator[Any]:
            """Every valid point, in NNI's order (NNI's own grid stops at the first invalid one)."""
            mutables = list(self.simplify().values())
            for values in itertools.product(*(list(m.grid(granularity=granularity)) for m in mutables)):
                try:
                    yield self.freeze({m.label: v for m, v in zip(mutables, values, strict=True)})
                except SampleValidationError:
                    continue

    class Engine(SequentialExecutionEngine):
        def budget_available(self) -> bool:
            return super().budget_available() and not stop()

    tried: list[dict[str, Any]] = []

    def evaluate(choices: Choices) -> None:
        tried.append(dict(choices))
        nni.report_final_result(-trial(dict(choices)))

    engine = Engine(max_model_count=cfg.budget)
    with _quiet_nni():
        strategy = _nni_strategy(cfg, seed)
        strategy.initialize(ModelSpace(Space(), FunctionalEvaluator(evaluate)), engine)
        try:
            strategy.run()
        except SampleValidationError as e:  # only TPE gets here: NNI's other strategies draw again
            raise NasDoseError(f"strategy nni ({cfg.algorithm}): NNI proposed an architecture that space "
                               f"'{space.name}' rejects ({e}); use algorithm random, grid or evolution "
                               "for a space with constraints") from None
    return tried


@register_strategy("nni")
class NniStrategy(ScoringStrategy):
    """NNI's multi-trial strategies (see the module docstring)."""

    Config = NniConfig

    def run(self, ctx: SearchContext) -> list[Candidate]:
        cfg: NniConfig = self.config
        trials = Trials(ctx, self.make_scorer(ctx), f"nni-{cfg.algorithm}")

        def trial(choices: dict[str, Any]) -> float:
            return trials.score(ctx.space.genotype(choices, ctx.macro)).score

        drive(ctx.space, cfg, derived_seed(ctx.seed, "nni", cfg.algorithm), trial, ctx.should_stop)
        return trials.ranked()
