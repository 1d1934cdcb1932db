"""The `optuna` strategy: Optuna's samplers over a space, scored by the search's evaluator; a
resumed search ends where an uninterrupted one does; several objectives with NSGA-II, pool
diversity among them."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("optuna")

# the same tiny data set (its fixture `data`) and search context as the evaluator's tests
from test_evaluator import context  # noqa: E402
from test_evaluator import data as tiny_data  # noqa: E402, F401

from nas_dose.config import ConfigError, from_dict  # noqa: E402
from nas_dose.errors import NasDoseError  # noqa: E402
from nas_dose.pool import Candidate  # noqa: E402
from nas_dose.search_spaces import Genotype  # noqa: E402
from nas_dose.strategies import get_strategy, list_strategies  # noqa: E402
from nas_dose.strategies.evaluator import CandidateEvaluator, prediction_ids, ranked  # noqa: E402


def strategy(scorer=None, **options):
    cls = get_strategy("optuna")
    return cls(from_dict(cls.Config, {"budget": 5, "evaluator": {"supernet_steps": 3}, **options}), scorer=scorer)


class ConstantScorer:
    """A cheap fake evaluator: each genotype predicts one constant, `level`, inside every patient
    the evaluator keeps predictions for, so that two candidates disagree by 2|a − b| / (a + b)."""

    def __init__(self, ctx, predictions: bool = True) -> None:
        self.slots = ctx.space.slots()
        self.ids = prediction_ids(ctx) if predictions else []

    def level(self, g: Genotype) -> float:
        return 1.0 + sum(values.index(g.choices[s]) for s, values in self.slots.items())

    def score(self, g: Genotype) -> Candidate:
        v = self.level(g)
        preds = {pid: np.full((16, 16, 16), v, np.float16) for pid in self.ids} or None
        return Candidate(g, float((7 * v) % 5 + 1), {"params": v, "flops": 10 * v}, preds)


def completed(ctx, tmp_path):
    """(genotype, objective values) of the study's completed trials, in order."""
    trials = json.loads((tmp_path / "optuna_trials.json").read_text())["trials"]
    return [(ctx.space.genotype(t["params"], ctx.macro), t["values"]) for t in trials if t["state"] == "COMPLETE"]


def disagreement(a: float, b: float) -> float:
    return 2 * abs(a - b) / (a + b)


def test_tpe_search_scores_its_trials_and_resumes_to_the_same_candidates(data, tmp_path):
    assert "optuna" in list_strategies()
    first = strategy().run(context(data, tmp_path, mode="none"))
    assert first and [c.score for c in first] == sorted(c.score for c in first)
    trials = json.loads((tmp_path / "optuna_trials.json").read_text())["trials"]
    assert len(trials) == 5 and all(t["state"] == "COMPLETE" for t in trials)
    scored = []
    original = CandidateEvaluator._score
    CandidateEvaluator._score = lambda self, g: scored.append(g) or original(self, g)  # type: ignore
    try:
        again = strategy().run(context(data, tmp_path, mode="none"))
    finally:
        CandidateEvaluator._score = original  # type: ignore
    assert not scored  # every trial answered from the evaluator's cache
    assert [(c.genotype, c.score) for c in again] == [(c.genotype, c.score) for c in first]


def test_nsga2_minimizes_score_and_cost(data, tmp_path):
    nsga2 = strategy(sampler="nsga2", population=4, sample=2, objectives=["score", "params"])
    nsga2.run(context(data, tmp_path, mode="none"))
    record = json.loads((tmp_path / "optuna_trials.json").read_text())
    assert record["objectives"] == ["score", "params"]
    assert all(len(t["values"]) == 2 for t in record["trials"] if t["state"] == "COMPLETE")


@pytest.mark.parametrize("options, message", [
    ({"objectives": ["params"]}, "'score' first"),
    ({"objectives": ["score", "flops"]}, "need nsga2"),
    ({"objectives": ["diversity", "score"]}, "'score' first"),
    ({"objectives": ["score", "diversity", "diversity"]}, "each once"),
    ({"members": 0}, "members"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        strategy(**options)


def test_pool_diversity_is_an_objective_against_the_best_candidates_so_far(data, tmp_path):
    ctx = context(data, tmp_path, mode="pool")
    scorer = ConstantScorer(ctx)
    found = strategy(lambda _: scorer, sampler="nsga2", population=4, sample=2, budget=10, members=2,
                     objectives=["score", "flops", "diversity"]).run(ctx)
    trials = completed(ctx, tmp_path)
    assert len(trials) == 10 and all(len(values) == 3 for _, values in trials)
    so_far: list[Candidate] = []
    for g, (score, flops, div) in trials:
        so_far.append(scorer.score(g))
        others = [c for c in ranked(so_far)[:2] if c.genotype.key() != g.key()]
        v = scorer.level(g)
        expected = -np.mean([disagreement(v, scorer.level(c.genotype)) for c in others]) if others else 0.0
        assert (score, flops) == (so_far[-1].score, 10 * v) and div == pytest.approx(expected, rel=1e-6)
    assert trials[0][1][2] == 0.0 and any(values[2] < 0 for _, values in trials)
    assert [c.score for c in found] == sorted(c.score for c in found)


def test_sequential_diversity_is_an_objective_against_the_references(data, tmp_path):
    ctx = context(data, tmp_path, mode="sequential")
    ctx = replace(ctx, references=[{pid: np.full((16, 16, 16), r, np.float32) for pid in prediction_ids(ctx)}
                                   for r in (3.0, 5.0)])
    scorer = ConstantScorer(ctx)
    strategy(lambda _: scorer, sampler="random", budget=6, objectives=["score", "diversity"]).run(ctx)
    trials = completed(ctx, tmp_path)
    assert len(trials) == 6
    for g, (_, div) in trials:
        v = scorer.level(g)
        assert div == pytest.approx(-(disagreement(v, 3.0) + disagreement(v, 5.0)) / 2, rel=1e-6)


def test_diversity_objective_needs_predictions(data, tmp_path):
    nsga2 = {"sampler": "nsga2", "population": 4, "sample": 2, "objectives": ["score", "diversity"]}
    with pytest.raises(ConfigError, match=r"^config key 'options.objectives': 'diversity' .*mode none"):
        strategy(lambda ctx: ConstantScorer(ctx), **nsga2).run(context(data, tmp_path, mode="none"))
    with pytest.raises(ConfigError, match="'diversity' needs the candidates' predictions; the evaluator's"):
        strategy(lambda ctx: ConstantScorer(ctx, predictions=False), **nsga2).run(context(data, tmp_path))
    scored: list[Genotype] = []

    def counting(ctx):
        scorer = ConstantScorer(ctx)
        return type("Counting", (), {"score": lambda self, g: scored.append(g) or scorer.score(g)})()

    without = replace(context(data, tmp_path), diversity_ids=[])  # pool mode, no patient to predict
    with pytest.raises(ConfigError, match=r"^config key 'options.objectives': 'diversity' needs .*has none$"):
        strategy(counting, **nsga2).run(without)
    assert not scored  # refused before any trial was scored
    with pytest.raises(NasDoseError, match="earlier members without the diversity objective"):
        strategy(lambda ctx: ConstantScorer(ctx), sampler="nsga2", objectives=["score", "flops"]).run(
            context(data, tmp_path, mode="sequential"))
