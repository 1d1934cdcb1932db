"""The `optuna` strategy: Optuna's samplers over a space, scored by the search's evaluator; a
resumed search ends where an uninterrupted one does; several objectives with NSGA-II."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("optuna")

# the same tiny data set (its fixture `data`) and search context as the evaluator's tests
from test_evaluator import context  # noqa: E402
from test_evaluator import data as tiny_data  # noqa: E402, F401

from nas_dose.config import ConfigError, from_dict  # noqa: E402
from nas_dose.strategies import get_strategy, list_strategies  # noqa: E402
from nas_dose.strategies.evaluator import CandidateEvaluator  # noqa: E402


def strategy(**options):
    cls = get_strategy("optuna")
    return cls(from_dict(cls.Config, {"budget": 5, "evaluator": {"supernet_steps": 3}, **options}))


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
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        strategy(**options)
