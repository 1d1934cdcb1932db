"""Random search: valid, distinct NNI samples; the budget; seeds; exact resume."""
from __future__ import annotations

import json

import pytest
from test_evolution import Interrupted, TargetScorer, TinySpace, fake_context, hidden_target

from nas_dose.config import from_dict
from nas_dose.search_spaces import get_space
from nas_dose.strategies import get_strategy
from nas_dose.strategies.random_search import RandomConfig, RandomStrategy


def run_random(space, tmp, seed=0, scorer=None, budget=20):
    ctx = fake_context(space, tmp, seed)
    scorer = scorer or TargetScorer(hidden_target(space, ctx.macro))
    return RandomStrategy(from_dict(RandomConfig, {"budget": budget}), scorer=lambda _: scorer).run(ctx), scorer


def test_registered_as_random():
    assert get_strategy("random") is RandomStrategy


def test_samples_are_valid_distinct_and_ranked():
    space = get_space("lenas_levels")
    cands, scorer = run_random(space, None, budget=30)
    assert len(cands) == 30 == scorer.calls
    assert len({c.genotype.key() for c in cands}) == 30
    for c in cands:
        space.validate(c.genotype)
    assert [c.score for c in cands] == sorted(c.score for c in cands)


def test_same_seed_same_samples_other_seed_others():
    space = get_space("lenas")
    keys = [[c.genotype.key() for c in run_random(space, None, seed=s, budget=8)[0]] for s in (1, 1, 2)]
    assert keys[0] == keys[1]
    assert keys[0] != keys[2]


def test_a_space_smaller_than_the_budget_is_exhausted_once():
    space = get_space(f"{TinySpace.__module__}:TinySpace")
    cands, scorer = run_random(space, None, budget=10)
    assert scorer.calls == 6 == len(cands) == space.size()


def test_interrupted_random_search_resumes_exactly(tmp_path):
    space = get_space("lenas")
    whole, _ = run_random(space, tmp_path / "whole", budget=15)
    with pytest.raises(Interrupted):
        run_random(space, tmp_path / "cut", scorer=TargetScorer(hidden_target(space, {"stem": 4, "widths": [8, 16]}),
                                                                 fail_after=6), budget=15)
    resumed, _ = run_random(space, tmp_path / "cut", budget=15)
    assert [c.genotype.key() for c in resumed] == [c.genotype.key() for c in whole]
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["child"] for r in log] == list(range(len(log)))  # no child twice, none skipped
