"""Latency as a search cost: the measurement (a median after warm-up, by a stand-in clock), the
`max_latency_ms` constraint rejecting a genotype before it is trained, the `latency_ms` metric
cached with the candidate, and the accuracy-cost front, budget and pool.yaml on latency; and
diversity as the front's third objective.

Nothing here depends on real timing: the clock or the measurement is replaced wherever a number
is asserted (a candidate's stand-in latency is its parameter count / 1000 ms)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_evaluator import context, genotypes  # the search context of the evaluator's tests
from test_search_cli import log_records, search
from torch import nn

from nas_dose.config import ConfigError, from_dict
from nas_dose.data.store import write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.pool import Candidate, load_pool
from nas_dose.pool.pareto import diversity_to_best, front_record, pareto_front, within_budget
from nas_dose.search_spaces import count_params, get_space, measure
from nas_dose.strategies import base
from nas_dose.strategies.evaluator import CandidateEvaluator, EvaluatorConfig, derived_seed, latency_device


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The evaluator tests' data set: 6 phantoms at 16³ (their context's patients)."""
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    write_dataset(path, synth_patients(6, 16, 0), source="synth", grid=16, total=6)
    return path


@pytest.fixture(scope="module")
def search_data(tmp_path_factory):
    """The search CLI tests' data set: 10 phantoms at 16³."""
    path = tmp_path_factory.mktemp("data") / "d.h5"
    write_dataset(path, synth_patients(10, 16, 0), source="synth", grid=16, total=10)
    return path


def stand_in_latency(model, shape, device, runs, autocast):
    """Seconds by the model's size: deterministic, and different between genotypes."""
    return count_params(model) * 1e-6


def test_latency_is_the_median_of_the_timed_passes_after_warm_up(monkeypatch):
    # clock reads: warm-up start; then (start, end) of 3 timed passes taking 3, 1 and 2 s
    reads = iter([0.0, 10.0, 13.0, 20.0, 21.0, 30.0, 32.0])
    monkeypatch.setattr(measure, "perf_counter", lambda: next(reads))
    model = nn.Conv3d(1, 2, 3, padding=1)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    seconds = measure.forward_latency(model, (1, 1, 4, 4, 4), torch.device("cpu"), runs=3, warmup=1)
    assert seconds == 2.0
    assert len(calls) == 4  # one warm-up and three timed passes (of a copy, its hook copied too)
    assert model.training  # the model itself is untouched


def test_a_genotype_over_max_latency_is_rejected_before_it_is_trained(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(base, "forward_latency", stand_in_latency)
    trained = []
    monkeypatch.setattr(CandidateEvaluator, "_fit", lambda self, net, params, steps, seed, **k: trained.append(seed))
    ctx = context(tiny_data, tmp_path, mode="none")
    gs = genotypes(ctx, 4, seed=3)
    latency = {g.key(): round(count_params(ctx.wrap(ctx.space.build(g))) / 1000, 4) for g in gs}
    limit = sorted(latency.values())[len(gs) // 2]
    cfg = EvaluatorConfig(mode="train", train_steps=1, max_latency_ms=limit)
    ev = CandidateEvaluator(ctx, cfg)
    cands = [ev.score(g) for g in gs]
    for g, c in zip(gs, cands):
        assert c.metrics["latency_ms"] == latency[g.key()]
        over = latency[g.key()] > limit
        assert (c.score == math.inf) == over and bool(c.metrics.get("rejected")) == over
        assert (derived_seed(0, "train", g.key()) in trained) == (not over)  # only those within were trained
    assert 0 < len(trained) < len(gs)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["latency_ms"] for r in logged if r["event"] == "scored"] == [c.metrics["latency_ms"] for c in cands]
    # resumed: every candidate, its latency with it, from the cache; nothing measured again
    monkeypatch.setattr(base, "forward_latency", lambda *a, **k: pytest.fail("measured again"))
    again = CandidateEvaluator(ctx, cfg)
    assert [again.score(g).metrics for g in gs] == [c.metrics for c in cands] and again.scored == 0
    # a genotype over max_params is not even measured
    small = min(count_params(ctx.space.build(g)) for g in gs)
    over_params = CandidateEvaluator(context(tiny_data, None, mode="none"),
                                     EvaluatorConfig(max_params=small - 1, max_latency_ms=limit)).score(gs[0])
    assert over_params.score == math.inf and "latency_ms" not in over_params.metrics
    with pytest.raises(ConfigError, match="max_latency_ms"):
        from_dict(EvaluatorConfig, {"max_latency_ms": 0})


def test_without_a_limit_or_a_latency_cost_nothing_is_measured(tiny_data, monkeypatch):
    monkeypatch.setattr(base, "forward_latency", lambda *a, **k: pytest.fail("measured"))
    ctx = context(tiny_data, None, mode="none")
    cand = CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=2)).score(genotypes(ctx, 1)[0])
    assert "latency_ms" not in cand.metrics and cand.metrics["flops"] > 0


def test_front_and_budget_on_latency(tiny_data):
    g = genotypes(context(tiny_data, None), 1)[0]
    cands = [Candidate(g, s, {"latency_ms": ms, "flops": 1.0}) for s, ms in
             [(1.0, 10.0), (2.0, 5.0), (2.5, 20.0), (0.5, 30.0)]] + [Candidate(g, 0.1, {"flops": 1.0})]
    assert pareto_front(cands, "latency") == [1, 0, 3]  # the one without a latency is left out
    assert within_budget(cands, "latency", 10.0) == cands[:2]
    record = front_record(cands, "latency")
    assert record["cost"] == "latency" and [p["latency_ms"] for p in record["front"]] == [5.0, 10.0, 30.0]


def test_a_search_with_latency_as_its_cost(search_data, tmp_path, monkeypatch):
    """pool.yaml's front and the pool under pool_max_cost are on latency_ms; a resumed search
    measures nothing again."""
    monkeypatch.setattr(base, "forward_latency", stand_in_latency)
    macro = {"stem": 4, "widths": [8]}
    space, rng = get_space("lenas"), np.random.RandomState(0)
    budget = float(np.median([count_params(space.build(space.sample(rng, macro))) / 1000 for _ in range(20)]))
    args = ["strategy=random", "macro.stem=4", "macro.widths=[8]", "pool_size=2", "diversity.mode=none",
            "options={budget: 6, evaluator: {supernet_steps: 3}}", "cost=latency", f"pool_max_cost={budget}"]
    out = tmp_path / "budget"
    search(search_data, out, *args)
    points = [(r["score"], r["latency_ms"]) for r in log_records(out) if r["event"] == "scored"]
    assert len(points) == 6 and any(ms > budget for _, ms in points)  # the budget bites
    pool = load_pool(out / "pool.yaml")
    assert pool.pareto["cost"] == "latency" and pool.pareto["front"]
    assert {(p["search_score"], p["latency_ms"]) for p in pool.pareto["front"]} <= set(points)
    assert all(m.metrics["latency_ms"] <= budget for m in pool.members)
    assert pool.members[0].search_score == min(s for s, ms in points if ms <= budget)  # the most accurate within
    assert (out / "plots" / "pareto.png").stat().st_size > 5000
    monkeypatch.setattr(base, "forward_latency", lambda *a, **k: pytest.fail("measured again"))
    search(search_data, out, *args, resume=True)
    assert load_pool(out / "pool.yaml").members == pool.members


def test_diversity_is_a_third_objective_of_the_recorded_front(tiny_data):
    g = genotypes(context(tiny_data, None), 1)[0]
    a = np.full((2, 2, 2), 0.5)
    masks = {"p": np.ones((2, 2, 2), bool)}

    def cand(score, flops, pred):
        return Candidate(g, score, {"flops": flops}, None if pred is None else {"p": pred})

    # the best; as accurate as the next but different from the best; the same; cheap; rejected
    cands = [cand(1.0, 10.0, a), cand(2.0, 10.0, 2 * a), cand(2.0, 10.0, a), cand(3.0, 5.0, a),
             cand(math.inf, 1.0, None)]
    diversity = diversity_to_best(cands, masks)
    assert diversity[:4] == pytest.approx([0.0, 2 / 3, 0.0, 0.0]) and math.isnan(diversity[4])
    assert pareto_front(cands, "flops") == [3, 0]
    assert pareto_front(cands, "flops", diversity) == [3, 0, 1]  # the different one joins the front
    record = front_record(cands, "flops", diversity)
    assert [p["search_score"] for p in record["front"]] == [3.0, 1.0]
    assert [p["disagreement"] for p in record["diversity_front"]] == pytest.approx([0.0, 0.0, 2 / 3])
    assert diversity_to_best([cand(1.0, 1.0, None)], masks) is None  # a search without predictions
    assert "diversity_front" not in front_record(cands, "flops")


def test_a_pool_search_records_the_front_with_diversity(search_data, tmp_path):
    out = tmp_path / "pool"
    search(search_data, out, "strategy=random", "macro.stem=4", "macro.widths=[8]", "pool_size=2",
           "diversity.mode=pool", "options={budget: 4, evaluator: {supernet_steps: 3}}")
    front = load_pool(out / "pool.yaml").pareto
    points = {(p["search_score"], p["flops"]) for p in front["front"]}
    diverse = {(p["search_score"], p["flops"]): p["disagreement"] for p in front["diversity_front"]}
    assert points <= set(diverse) and "disagreement" in front["diversity"]
    best = min(points)[0]
    assert all(d == 0.0 for (s, _), d in diverse.items() if s == best) and any(d > 0 for d in diverse.values())


def test_nsga2_minimizes_score_and_latency(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    from nas_dose.strategies import get_strategy

    monkeypatch.setattr(base, "forward_latency", stand_in_latency)
    cls = get_strategy("optuna")
    cfg = from_dict(cls.Config, {"budget": 4, "sampler": "nsga2", "population": 2, "sample": 2,
                                 "objectives": ["score", "latency"], "evaluator": {"supernet_steps": 2}})
    cands = cls(cfg).run(context(tiny_data, tmp_path, mode="none"))  # the search's cost is not latency
    trials = json.loads((tmp_path / "optuna_trials.json").read_text())["trials"]
    by_score = {c.score: c.metrics["latency_ms"] for c in cands}
    done = [t["values"] for t in trials if t["state"] == "COMPLETE"]
    assert done and all(by_score[score] == latency for score, latency in done)


def test_the_cache_names_the_kind_of_device_not_a_ranks_gpu(monkeypatch):
    """Under torchrun each rank measures on its own GPU (cuda:0, cuda:1, ...): the evaluator's
    settings, which every rank checks against the cache's, must not differ between them."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "H200")
    assert latency_device(torch.device("cuda", 0)) == latency_device(torch.device("cuda", 1)) == "cuda (H200)"
    assert latency_device(torch.device("cpu")) == "cpu"
