"""Aging evolution on cheap rigged objectives (no training): mutation, aging, the budget,
diversity fitness, that it beats random search, and exact resume after an interruption.

`TargetScorer`, `fake_context` and `TinySpace` are also used by the random and NNI tests.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nas_dose.config import ConfigError, from_dict
from nas_dose.errors import NasDoseError
from nas_dose.io import load_checkpoint
from nas_dose.pool import Candidate, DiversityConfig
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.search_spaces import Genotype, SearchSpace, genotype_from_dict, get_space
from nas_dose.strategies.base import SearchContext
from nas_dose.strategies.evaluator import derived_seed
from nas_dose.strategies.evolution import PATIENCE, EvolutionConfig, EvolutionStrategy, fitness, mean_disagreement
from nas_dose.strategies.random_search import RandomConfig, RandomStrategy


class Interrupted(Exception):
    """Stands for a search killed mid-way."""


class TargetScorer:
    """Score = number of slots that differ from a hidden target genotype (0 is best).

    Counts the genotypes it scores; `fail_after` raises Interrupted instead of scoring more.
    """

    def __init__(self, target: Genotype, fail_after: int | None = None) -> None:
        self.target = target
        self.fail_after = fail_after
        self.calls = 0
        self.cache: dict[Any, Candidate] = {}

    def score(self, g: Genotype) -> Candidate:
        if g.key() in self.cache:
            return self.cache[g.key()]
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted
        self.calls += 1
        mismatches = sum(g.choices[s] != v for s, v in self.target.choices.items())
        self.cache[g.key()] = c = Candidate(g, float(mismatches), {})
        return c


class TinySpace(SearchSpace):
    """6 architectures: smaller than some budgets below. Loaded by import path (not registered)."""

    version = 1

    def slots(self) -> dict[str, list]:
        return {"a.op": ["conv", "identity", "se_conv"], "b.op": ["conv", "identity"]}

    def default_macro(self) -> dict[str, Any]:
        return {"stem": 4}


def fake_context(space: SearchSpace, tmp: Path | None, seed: int = 0) -> SearchContext:
    """A context for fake scorers: no data is ever read."""
    macro = {"stem": 4, "widths": [8, 16]} if space.name == "lenas" else {}
    return SearchContext(space, macro, Path("unused.h5"), Runtime(RuntimeConfig(device="cpu")), seed,
                         weight_ids=["w"], arch_ids=["a"], diversity_ids=[], diversity=DiversityConfig(mode="none"),
                         state_dir=None if tmp is None else tmp / "state",
                         log_path=None if tmp is None else tmp / "log.jsonl")


def hidden_target(space: SearchSpace, macro: dict[str, Any]) -> Genotype:
    return space.sample(np.random.RandomState(12345), macro)


def children_log(tmp: Path) -> list[dict[str, Any]]:
    lines = (tmp / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "child"]


def run_evolution(space: SearchSpace, tmp: Path | None, seed: int = 0, scorer: TargetScorer | None = None,
                  **options: Any) -> tuple[list[Candidate], TargetScorer]:
    ctx = fake_context(space, tmp, seed)
    scorer = scorer or TargetScorer(hidden_target(space, ctx.macro))
    cfg = from_dict(EvolutionConfig, {"budget": 40, "population": 8, "sample": 3, **options})
    return EvolutionStrategy(cfg, scorer=lambda _: scorer).run(ctx), scorer


def test_mutation_changes_exactly_one_slot_of_a_population_member(tmp_path):
    space = get_space("lenas_levels")
    run_evolution(space, tmp_path, budget=50, population=6)
    log = children_log(tmp_path)
    state = load_checkpoint(tmp_path / "state" / "evolution.pt")
    genotypes = [genotype_from_dict(d) for d in state["children"]]
    assert len(genotypes) == len(log)
    mutated = [r for r in log if r["parent"] is not None]
    assert [r["parent"] for r in log[:6]] == [None] * 6 and len(mutated) == len(log) - 6
    for r in mutated:
        child, parent = genotypes[r["child"]], genotypes[r["parent"]]
        kept = set(space.active_slots(child)) & set(space.active_slots(parent))  # a depth changes more
        assert sum(child.choices[s] != parent.choices[s] for s in kept) == 1
        # aging: the parent is one of the 6 most recent children, however good older ones were
        assert r["child"] - 6 <= r["parent"] < r["child"]


def test_the_oldest_dies_even_when_it_is_the_best(tmp_path):
    space = get_space("lenas")
    macro = {"stem": 4, "widths": [8, 16]}
    first = space.sample(np.random.RandomState(derived_seed(0, "evolution")), macro)
    scorer = TargetScorer(first)  # the very first child is the global optimum (score 0)
    cands, _ = run_evolution(space, tmp_path, scorer=scorer, budget=30, population=4, sample=4)
    log = children_log(tmp_path)
    assert log[0]["score"] == 0.0 and cands[0].score == 0.0
    # S = P: the first tournament sees the whole population and picks the optimum; then the
    # optimum is the oldest member and dies, and is never a parent again
    assert log[4]["parent"] == 0
    assert all(r["parent"] != 0 for r in log[5:])


def test_budget_counts_distinct_genotypes(tmp_path):
    space = get_space("lenas")
    cands, scorer = run_evolution(space, None, budget=25, population=5)
    assert len(cands) == 25 == scorer.calls
    assert len({c.genotype.key() for c in cands}) == 25
    assert [c.score for c in cands] == sorted(c.score for c in cands)


def test_search_of_a_space_smaller_than_the_budget_ends(tmp_path):
    space = get_space(f"{__name__}:TinySpace")
    cands, scorer = run_evolution(space, tmp_path, budget=10, population=3, sample=2)
    assert len(cands) == 6 == scorer.calls  # every architecture once, then patience ran out
    assert len(children_log(tmp_path)) == PATIENCE * 10


def test_evolution_beats_random_search_on_a_rigged_objective():
    space = get_space("lenas_levels")  # 34 slots: random draws match about a third of them
    best_evo, best_rand = [], []
    for seed in range(3):
        ctx = fake_context(space, None, seed)
        target = hidden_target(space, ctx.macro)
        evo = EvolutionStrategy(from_dict(EvolutionConfig, {"budget": 150, "population": 15, "sample": 5}),
                                scorer=lambda _, t=target: TargetScorer(t)).run(ctx)
        rnd = RandomStrategy(from_dict(RandomConfig, {"budget": 150}),
                             scorer=lambda _, t=target: TargetScorer(t)).run(fake_context(space, None, seed))
        best_evo.append(evo[0].score)
        best_rand.append(rnd[0].score)
    assert np.mean(best_evo) + 3 <= np.mean(best_rand), (best_evo, best_rand)


def test_interrupted_search_resumes_exactly(tmp_path):
    space = get_space("lenas_levels")
    whole, _ = run_evolution(space, tmp_path / "whole", budget=30, population=6)
    target = hidden_target(space, {})
    with pytest.raises(Interrupted):
        run_evolution(space, tmp_path / "cut", scorer=TargetScorer(target, fail_after=11), budget=30, population=6)
    resumed, _ = run_evolution(space, tmp_path / "cut", budget=30, population=6)
    assert [(c.genotype.key(), c.score) for c in resumed] == [(c.genotype.key(), c.score) for c in whole]
    strip = [{k: v for k, v in r.items() if k != "time"} for r in children_log(tmp_path / "whole")]
    assert [{k: v for k, v in r.items() if k != "time"} for r in children_log(tmp_path / "cut")] == strip


def test_resume_with_other_settings_is_refused_but_a_larger_budget_is_not(tmp_path):
    space = get_space("lenas")
    run_evolution(space, tmp_path, budget=10, population=4)
    with pytest.raises(NasDoseError, match="population"):
        run_evolution(space, tmp_path, budget=10, population=5)
    cands, _ = run_evolution(space, tmp_path, budget=14, population=4)
    assert len(cands) == 14


def _cand(key: str, score: float, value: float | None) -> Candidate:
    g = Genotype("lenas", 1, {"slot": key}, {})
    return Candidate(g, score, {}, None if value is None else {"p1": np.full(4, value, np.float16)})


def test_fitness_with_pool_and_sequential_diversity():
    masks = {"p1": np.array([1, 1, 1, 0], bool)}
    a, b, c = _cand("a", 2.0, 1.0), _cand("b", 2.5, 3.0), _cand("c", 3.0, None)
    # disagreement of constant predictions 1 and 3: 2 * 2 / (1 + 3) = 1
    assert mean_disagreement(a.predictions, b.predictions, masks) == pytest.approx(1.0)
    pool = DiversityConfig(mode="pool", lam=0.5)
    assert fitness(a, [a, b], pool, [], masks) == pytest.approx(-2.0 + 0.5 * 1.0)
    assert fitness(a, [a], pool, [], masks) == -2.0  # no other member to differ from
    assert fitness(c, [a, b], pool, [], masks) == -3.0  # no predictions: accuracy only
    assert fitness(a, [a, b], DiversityConfig(mode="none"), [], masks) == -2.0
    seq = DiversityConfig(mode="sequential", weight=10.0, margin=0.2)
    near = {"p1": np.full(4, 1.1, np.float32)}  # disagreement 2 * 0.1 / 2.1
    assert fitness(a, [], seq, [near], masks) == pytest.approx(-2.0 - 10.0 * (0.2 - 0.2 / 2.1), rel=1e-3)
    assert fitness(a, [], seq, [b.predictions], masks) == -2.0  # far enough: no penalty


def test_config_is_validated():
    with pytest.raises(ConfigError, match="sample"):
        from_dict(EvolutionConfig, {"population": 4, "sample": 5})
    with pytest.raises(ConfigError, match="budget"):
        from_dict(EvolutionConfig, {"budget": 0})
    with pytest.raises(ConfigError, match="evaluator.supernet_steps"):
        from_dict(EvolutionConfig, {"evaluator": {"supernet_steps": 0}})
