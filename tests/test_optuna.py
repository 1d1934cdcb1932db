"""The `optuna` strategy: Optuna's samplers over a space, scored by the search's evaluator; a
resumed search ends where an uninterrupted one does; several objectives with NSGA-II."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from nas_dose.config import ConfigError, from_dict  # noqa: E402
from nas_dose.data.store import write_dataset  # noqa: E402
from nas_dose.data.synth import synth_patients  # noqa: E402
from nas_dose.pool import DiversityConfig  # noqa: E402
from nas_dose.runtime import Runtime, RuntimeConfig  # noqa: E402
from nas_dose.search_spaces import get_space  # noqa: E402
from nas_dose.strategies import get_strategy, list_strategies  # noqa: E402
from nas_dose.strategies.base import SearchContext  # noqa: E402
from nas_dose.strategies.evaluator import CandidateEvaluator  # noqa: E402

TINY = {"stem": 4, "widths": [8, 16]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    write_dataset(path, synth_patients(6, 16, 0), source="synth", grid=16, total=6)
    return path


def context(data: Path, state: Path | None) -> SearchContext:
    return SearchContext(get_space("lenas"), TINY, data, Runtime(RuntimeConfig(device="cpu", threads=1)), 0,
                         ["pt_1", "pt_2", "pt_3"], ["pt_4", "pt_5"], ["pt_6"], diversity=DiversityConfig(mode="none"),
                         state_dir=state, log_path=None if state is None else state / "log.jsonl")


def strategy(**options):
    cls = get_strategy("optuna")
    return cls(from_dict(cls.Config, {"budget": 5, "evaluator": {"supernet_steps": 3}, **options}))


def test_tpe_search_scores_its_trials_and_resumes_to_the_same_candidates(data, tmp_path):
    assert "optuna" in list_strategies()
    first = strategy().run(context(data, tmp_path))
    assert first and [c.score for c in first] == sorted(c.score for c in first)
    trials = json.loads((tmp_path / "optuna_trials.json").read_text())["trials"]
    assert len(trials) == 5 and all(t["state"] == "COMPLETE" for t in trials)
    scored = []
    original = CandidateEvaluator._score
    CandidateEvaluator._score = lambda self, g: scored.append(g) or original(self, g)  # type: ignore
    try:
        again = strategy().run(context(data, tmp_path))
    finally:
        CandidateEvaluator._score = original  # type: ignore
    assert not scored  # every trial answered from the evaluator's cache
    assert [(c.genotype, c.score) for c in again] == [(c.genotype, c.score) for c in first]


def test_nsga2_minimizes_score_and_cost(data, tmp_path):
    strategy(sampler="nsga2", population=4, sample=2, objectives=["score", "params"]).run(context(data, tmp_path))
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
