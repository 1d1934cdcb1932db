"""NNI's strategies over nasdose spaces, driven directly: valid samples, the trial budget,
seeded repeatability (how a resumed search finds its cached trials), and nothing in $HOME."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from test_evolution import Interrupted, TargetScorer, TinySpace, fake_context, hidden_target

from nas_dose.config import ConfigError, from_dict
from nas_dose.errors import NasDoseError
from nas_dose.search_spaces import get_space
from nas_dose.strategies import get_strategy
from nas_dose.strategies.nni_backend import NniConfig, NniStrategy, drive


class ConstrainedSpace(TinySpace):
    """TinySpace, where se_conv followed by identity is not allowed: 5 valid architectures."""

    def validate(self, g, source=""):
        super().validate(g, source)
        if g.choices["a.op"] == "se_conv" and g.choices["b.op"] == "identity":
            raise NasDoseError(f"{source or 'genotype'}: se_conv then identity is not allowed")


@pytest.fixture(autouse=True)
def _no_tpe_polling(monkeypatch):
    """NNI's TPE wrapper sleeps a second per trial to poll its engine; ours is sequential."""
    from nni.nas.strategy import hpo

    monkeypatch.setattr(hpo.time, "sleep", lambda seconds: None)


def run_nni(space, algorithm, budget, seed=0, **options):
    ctx = fake_context(space, None, seed)
    scorer = TargetScorer(hidden_target(space, ctx.macro))
    cfg = from_dict(NniConfig, {"algorithm": algorithm, "budget": budget, **options})
    return NniStrategy(cfg, scorer=lambda _: scorer).run(ctx), scorer


@pytest.mark.parametrize("algorithm, budget", [("random", 12), ("grid", 12), ("evolution", 12), ("tpe", 12)])
def test_nni_strategies_run_over_our_spaces(algorithm, budget):
    for name in ("lenas", "lenas_levels"):
        space = get_space(name)
        cands, scorer = run_nni(space, algorithm, budget, population=4, sample=2)
        # NNI deduplicates: every trial is new, but two lenas_levels trials may differ only in
        # the cells of levels beyond their depth: one network, one genotype, scored once
        assert len(cands) == scorer.calls <= budget and (name == "lenas_levels" or len(cands) == budget)
        for c in cands:
            space.validate(c.genotype)
        assert [c.score for c in cands] == sorted(c.score for c in cands)


@pytest.mark.parametrize("algorithm", ["random", "grid", "evolution"])
def test_samples_the_space_rejects_are_never_tried(algorithm):
    space = get_space(f"{__name__}:ConstrainedSpace")
    cfg = from_dict(NniConfig, {"algorithm": algorithm, "budget": 10, "population": 2, "sample": 2})
    tried = drive(space, cfg, 0, lambda choices: 1.0)
    assert {"a.op": "se_conv", "b.op": "identity"} not in tried
    assert len(tried) == len({tuple(sorted(t.items())) for t in tried})
    if algorithm == "grid":
        assert len(tried) == 5  # every valid architecture, once


def test_tpe_on_a_space_with_constraints_fails_with_a_clear_error():
    space = get_space(f"{__name__}:ConstrainedSpace")
    with pytest.raises(NasDoseError, match="rejects .*se_conv then identity"):
        drive(space, from_dict(NniConfig, {"algorithm": "tpe", "budget": 10}), 0, lambda choices: 1.0)


def test_registered_as_nni():
    assert get_strategy("nni") is NniStrategy


def test_nni_evolution_mutates_from_its_population():
    # RegularizedEvolution with a tiny population must improve on its own random start
    space = get_space("lenas_levels")
    target = hidden_target(space, {})
    scores: list[float] = []

    def trial(choices):
        scores.append(float(sum(choices[s] != v for s, v in target.choices.items())))
        return scores[-1]

    cfg = from_dict(NniConfig, {"algorithm": "evolution", "budget": 80, "population": 8, "sample": 4,
                                "mutation_prob": 0.1})
    drive(space, cfg, 0, trial)
    assert len(scores) == 80
    assert min(scores[40:]) < min(scores[:8])


@pytest.mark.parametrize("algorithm", ["random", "grid", "evolution", "tpe"])
def test_same_seed_proposes_the_same_trials(algorithm):
    space = get_space("lenas")
    runs = [drive(space, from_dict(NniConfig, {"algorithm": algorithm, "budget": 10, "population": 4,
                                               "sample": 2}), seed, lambda ch: 1.0) for seed in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_ends_the_search_before_the_next_trial():
    seen: list = []

    def trial(choices):
        seen.append(choices)
        return 1.0

    tried = drive(get_space("lenas"), NniConfig(algorithm="random", budget=10), 0, trial, stop=lambda: len(seen) >= 3)
    assert len(tried) == 3 == len(seen)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="algorithm"):
        from_dict(NniConfig, {"algorithm": "enas"})
    with pytest.raises(ConfigError, match="mutation_prob"):
        from_dict(NniConfig, {"mutation_prob": 0})


def test_nothing_is_written_to_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = textwrap.dedent("""
        import nas_dose
        from nas_dose.search_spaces import get_space
        from nas_dose.strategies.nni_backend import NniConfig, drive
        space = get_space("lenas")
        for algorithm in ("random", "grid", "evolution", "tpe"):
            tried = drive(space, NniConfig(algorithm=algorithm, budget=2, population=2, sample=1), 0,
                          lambda ch: float(len(ch)))
            assert len(tried) == 2, (algorithm, tried)
        print("ok")
    """)
    env = {**os.environ, "HOME": str(home)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
    assert list(home.iterdir()) == []


@pytest.mark.parametrize("algorithm", ["evolution", "tpe"])
def test_an_interrupted_search_rerun_on_the_cache_scores_only_new_trials(algorithm):
    space = get_space("lenas")
    whole, _ = run_nni(space, algorithm, 12, population=4, sample=2)
    ctx = fake_context(space, None)
    cfg = from_dict(NniConfig, {"algorithm": algorithm, "budget": 12, "population": 4, "sample": 2})
    scorer = TargetScorer(hidden_target(space, ctx.macro), fail_after=5)
    with pytest.raises(Interrupted):
        NniStrategy(cfg, scorer=lambda _: scorer).run(ctx)
    scorer.fail_after = None  # the same cache, as the evaluator's persisted one
    resumed = NniStrategy(cfg, scorer=lambda _: scorer).run(fake_context(space, None))
    assert [(c.genotype.key(), c.score) for c in resumed] == [(c.genotype.key(), c.score) for c in whole]
    assert scorer.calls == 12
