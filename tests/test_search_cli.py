import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import test_differentiable  # registers the rigged space 'test_rigged'
import torch
from torch import nn

from nas_dose.cli import search as search_cli
from nas_dose.config import load_config
from nas_dose.errors import NasDoseError
from nas_dose.pool import Candidate, load_pool
from nas_dose.progress import set_quiet
from nas_dose.search_spaces import load_genotype, register_space
from nas_dose.strategies import SearchContext, Strategy, register_strategy
from nas_dose.strategies import search as search_stage
from nas_dose.strategies.evaluator import CandidateEvaluator, prediction_ids

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def data(search_data) -> Path:
    set_quiet(True)
    return search_data


def search(data: Path, out: Path, *overrides: str, resume: bool = False, config: Path | None = None) -> None:
    parser = argparse.ArgumentParser()
    search_cli.add_arguments(parser, argparse.ArgumentParser(add_help=False))
    argv = ["--data", str(data), "--out", str(out), *(["--resume"] if resume else []),
            *(["--config", str(config)] if config else []), "runtime.device=cpu", *overrides]
    search_cli.main(parser.parse_args(argv))


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "search_log.jsonl").read_text().splitlines()]


def test_lenas_search_writes_a_valid_pool(data, tmp_path):
    out = tmp_path / "run"
    search(data, out, "macro.stem=4", "macro.widths=[8]", "pool_size=2", "options.epochs=1",
           "options.steps_per_epoch=2", "options.candidates=3")
    pool = load_pool(out / "pool.yaml")
    assert pool.space == "lenas" and pool.strategy == "differentiable" and pool.names == ["m0", "m1"]
    assert pool.members[0].genotype != pool.members[1].genotype
    assert all(m.genotype.macro["widths"] == [8] and m.search_score > 0 for m in pool.members)
    assert "inherited weights" in pool.predictions and "pt_8, pt_9" in pool.predictions
    d = pool.matrices["disagreement"]
    assert d[0, 0] == 0 and d[0, 1] == d[1, 0] > 0
    assert pool.matrices["genotype_distance"][0, 1] == pytest.approx(
        sum(pool.members[0].genotype.choices[s] != pool.members[1].genotype.choices[s]
            for s in pool.members[0].genotype.choices) / 8)
    for m in pool.members:
        assert load_genotype(out / "genotypes" / f"{m.name}.yaml") == m.genotype
    for name in ("arch_weights", "fitness", "diversity"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5000
    saved = load_config(search_stage.SearchConfig, out / "config.yaml")
    assert saved.options["epochs"] == 1 and saved.options["weight_optim"]["lr"] == 1e-3  # resolved options
    assert pool.config["options"] == saved.options
    events = [r["event"] for r in log_records(out)]
    assert events.count("epoch") == 1 and events.count("candidate") == 3 and events[-1] == "pool"
    selection = next(r for r in log_records(out) if r["event"] == "selection")
    assert selection["candidates"] == 3 and len(selection["chosen"]) == 2

    with pytest.raises(NasDoseError, match="already holds a search"):
        search(data, out, "macro.stem=4", "macro.widths=[8]")
    with pytest.raises(NasDoseError, match=r"different config \(pool_size\)"):
        search(data, out, resume=True, config=out / "config.yaml", *["pool_size=3"])
    before = (out / "pool.yaml").read_text()
    search(data, out, resume=True)  # a finished search resumes to the same pool, from its state
    assert (out / "pool.yaml").read_text() == before
    assert [r["event"] for r in log_records(out)].count("runtime") == 1  # the same runtime: logged once


def test_a_search_resumed_with_another_thread_count_is_logged_and_told(data, tmp_path, capsys):
    out, threads = tmp_path / "run", torch.get_num_threads()
    options = ("macro.stem=2", "macro.widths=[4]", "pool_size=1", "options.epochs=1", "options.steps_per_epoch=1",
               "options.candidates=1")
    try:
        search(data, out, f"runtime.threads={threads}", *options)
        set_quiet(False)
        capsys.readouterr()
        search(data, out, f"runtime.threads={threads + 1}", resume=True)
        told = capsys.readouterr().out
    finally:
        set_quiet(True)
        torch.set_num_threads(threads)
    runtimes = [(r["device"], r["threads"]) for r in log_records(out) if r["event"] == "runtime"]
    assert runtimes == [("cpu", threads), ("cpu", threads + 1)]
    assert f"resumed on cpu with {threads + 1} thread(s); the search began on cpu with {threads}" in told


SEQUENTIAL = ("space=test_rigged", "pool_size=2", "diversity.mode=sequential", "diversity.margin=1.0",
              "options.epochs=3", "options.steps_per_epoch=4", "options.arch_optim.lr=0.05",
              "options.weight_optim.lr=0.01", "options.candidates=2")


def test_sequential_members_differ_and_feel_the_hinge(data, tmp_path):
    out = tmp_path / "seq"
    search(data, out, *SEQUENTIAL)
    pool = load_pool(out / "pool.yaml")
    # the first search's answer is its strongest op; the second had to differ from it
    assert [m.genotype.choices["path"] for m in pool.members] == ["identity", "zero"]
    assert [m.metrics["search"] for m in pool.members] == [0.0, 1.0]
    epochs = [r for r in log_records(out) if r["event"] == "epoch"]
    assert all(r["hinge"] == 0 for r in epochs if r["search"] == 0)  # nothing to differ from yet
    assert any(r["hinge"] > 0 for r in epochs if r["search"] == 1)
    if pool.members[1].metrics["fallback"]:  # the second search's best was a member already
        assert any(r["event"] == "fallback" and r["search"] == 1 for r in log_records(out))
    # its own seed; the hinge moved its α, so it counts as active (derive=argmax: its answer is the member)
    assert [r["seed"] for r in log_records(out) if r["event"] == "sequential_search"] == [
        0, search_stage.search_seed(0, 1)]
    [hinge] = [r for r in log_records(out) if r["event"] == "hinge"]
    assert hinge["active"] is True and pool.members[1].metrics["hinge_active"] == 1.0


def killed_in_search_1(data: Path, out: Path, monkeypatch, overrides: tuple[str, ...], event: str, number: int) -> None:
    """A sequential search into `out` killed once search 1 logged its `event` number `number`."""
    log = SearchContext.log

    def interrupt(self, record):
        log(self, record)
        if self.log_fields.get("search") == 1 and record.get("event") == event and record[event] == number:
            raise KeyboardInterrupt

    monkeypatch.setattr(SearchContext, "log", interrupt)
    with pytest.raises(KeyboardInterrupt):
        search(data, out, *overrides)
    monkeypatch.setattr(SearchContext, "log", log)
    assert (out / "state" / "member0.pt").exists() and not (out / "pool.yaml").exists()


def test_interrupted_sequential_search_resumes_to_the_same_pool(data, tmp_path, monkeypatch):
    search(data, tmp_path / "whole", *SEQUENTIAL)
    # killed before epoch 2's checkpoint: search 1 resumes from epoch 1
    killed_in_search_1(data, tmp_path / "cut", monkeypatch, SEQUENTIAL, "epoch", 2)
    search(data, tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "pool.yaml").read_text() == (tmp_path / "whole" / "pool.yaml").read_text()
    assert [r["event"] for r in log_records(tmp_path / "cut")].count("resume") == 1
    # the log is the uninterrupted search's, the resume aside: epoch 2 redone is logged once
    untimed = [[{k: v for k, v in r.items() if k != "time"} for r in log_records(tmp_path / run)
                if r["event"] != "resume"] for run in ("whole", "cut")]
    assert untimed[0] == untimed[1]


def test_split_is_disjoint_and_seeded(data):
    cfg = search_stage.SplitConfig()
    weight, arch, div = search_stage.split_patients(data, cfg, seed=0)
    assert sorted(weight + arch) == sorted(f"pt_{i}" for i in range(1, 8)) and not set(weight) & set(arch)
    assert len(arch) == 2 and div == ["pt_8", "pt_9"]
    assert search_stage.split_patients(data, cfg, seed=0) == (weight, arch, div)
    assert any(search_stage.split_patients(data, cfg, seed=s)[1] != arch for s in range(1, 5))
    split = search_stage.SplitConfig(arch_split="validation", max_diversity_patients=1)
    w, a, _ = search_stage.split_patients(data, split, 0)
    assert a == ["pt_8", "pt_9"] and len(w) == 7


@pytest.mark.parametrize("overrides, message", [
    (["strategy=annealing"], "unknown strategy 'annealing'"),
    (["strategy=random", "diversity.mode=sequential"], "cannot search against earlier members"),
    (["strategy=optuna", "diversity.mode=sequential"], "earlier members without the diversity objective"),
    (["strategy=optuna", "diversity.mode=none", "options={sampler: nsga2, objectives: [score, diversity]}"],
     "config key 'options.objectives': 'diversity' needs the candidates' predictions"),
    (["options.epochs=0"], "config key 'epochs': must be at least 1"),
    (["space=nowhere"], "unknown search space 'nowhere'"),
    (["data.arch_fraction=1.5"], "data.arch_fraction"),
])
def test_bad_configs_fail_before_any_work(data, tmp_path, overrides, message):
    with pytest.raises(NasDoseError, match=message):
        search(data, tmp_path / "x", *overrides)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["search_differentiable.yaml", "search_evolution.yaml"])
def test_example_configs_resolve(name):
    cfg = load_config(search_stage.SearchConfig, CONFIGS / name)
    search_stage.get_strategy(cfg.strategy).from_options(cfg.options)


def test_the_pool_records_the_accuracy_cost_front_and_keeps_within_a_budget(data, tmp_path):
    from nas_dose.pool import Candidate
    from nas_dose.pool.pareto import pareto_front

    common = ["strategy=random", "macro.stem=4", "macro.widths=[8]", "pool_size=2", "diversity.mode=none",
              "options={budget: 6, evaluator: {supernet_steps: 3}}", "cost=params"]
    out = tmp_path / "free"
    search(data, out, *common)
    front = load_pool(out / "pool.yaml").pareto
    assert front["cost"] == "params" and front["front"]
    scored = [r for r in log_records(out) if r["event"] == "scored"]
    points = [(r["score"], r["params"]) for r in scored]
    for f in front["front"]:  # every front point is scored, and none is beaten on both axes
        assert (f["search_score"], f["params"]) in points
        assert not any(s <= f["search_score"] and p <= f["params"] and (s, p) != (f["search_score"], f["params"])
                       for s, p in points)
    assert (out / "plots" / "pareto.png").stat().st_size > 5000
    budget = sorted(p for _, p in points)[2]
    out = tmp_path / "budget"
    search(data, out, *common, f"pool_max_cost={budget}")
    assert all(m.metrics["params"] <= budget for m in load_pool(out / "pool.yaml").members)
    # the front by hand: a candidate dominated on both axes is left out
    def cand(score: float, params: float) -> Candidate:
        return Candidate(load_pool(out / "pool.yaml").members[0].genotype, score, {"params": params})
    cands = [cand(1.0, 10.0), cand(2.0, 5.0), cand(2.5, 20.0), cand(0.5, 30.0)]
    assert pareto_front(cands, "params") == [1, 0, 3]


def test_a_depth_the_grid_cannot_hold_is_left_out_before_the_search(data, tmp_path, capsys):
    """lenas_levels at 16³: depth 4 would end in a one-voxel bottleneck; it is removed from the
    space (a line and a log record say so), so no candidate has it and nothing fails."""
    from nas_dose.search_spaces import get_space

    out = tmp_path / "levels"
    set_quiet(False)
    try:
        search(data, out, "space=lenas_levels", "macro={stem: 2, widths: [4, 4, 8, 8]}", "strategy=random",
               "pool_size=2", "diversity.mode=none", "options={budget: 6, evaluator: {supernet_steps: 2}}")
    finally:
        set_quiet(True)
    assert "left out depth 4" in capsys.readouterr().out
    fitted = next(r for r in log_records(out) if r["event"] == "space_fitted")
    assert fitted["removed"] == {"depth": [4]}
    scored = [r for r in log_records(out) if r["event"] == "scored"]
    assert scored and all(r["genotype"]["choices"]["depth"] in (2, 3) for r in scored)
    space, removed = get_space("lenas_levels").fitted({"stem": 2, "widths": [4, 4, 8, 8]}, 32)
    assert removed == {} and space.slots()["depth"] == [2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Sequential diversity that explores (issue 17).

@dataclass
class NoOptions:
    pass


@register_strategy("test_three")
class ThreeCandidates(Strategy):
    """Three fixed genotypes of test_rigged's little sibling: A (the most accurate), B (almost A's
    predictions) and C (far from A, least accurate); records the seed each search gets."""

    Config = NoOptions
    uses_references = True
    seeds: list[int] = []

    def run(self, ctx):
        ThreeCandidates.seeds.append(ctx.seed)
        targets, _ = ctx.targets(prediction_ids(ctx))
        space = ctx.space
        gs = [space.genotype({"a": a, "b": b}, ctx.macro) for a, b in ((ID, ID), (ID, ZERO), (ZERO, ID))]
        return [Candidate(g, score, {"params": 1.0, "flops": 1.0}, {pid: (t * factor).astype(np.float16)
                                                                     for pid, t in targets.items()})
                for g, score, factor in zip(gs, (1.0, 1.1, 1.5), (1.0, 1.02, 0.4))]


@register_space("test_two_slots")
class TwoSlots(test_differentiable.RiggedSpace):
    def slots(self):
        return {"a": ["zero", "identity"], "b": ["zero", "identity"]}

    def construct(self, choices, macro, make):
        return nn.Sequential(make("a", "cell", 10, 10), make("b", "cell", 10, 10), nn.Conv3d(10, 1, 1))


ID, ZERO = "identity", "zero"
THREE = ("space=test_two_slots", "strategy=test_three", "pool_size=2", "diversity.mode=sequential")


@pytest.mark.parametrize("margin, member, active", [(0.2, (ZERO, ID), True), (0.01, (ID, ZERO), False)])
def test_the_sequential_member_is_chosen_with_the_hinge_and_the_log_says_when_it_was_inactive(
        data, tmp_path, margin, member, active, capsys):
    ThreeCandidates.seeds.clear()
    set_quiet(False)
    try:
        search(data, tmp_path / "run", *THREE, f"diversity.margin={margin}")
    finally:
        set_quiet(True)
    pool = load_pool(tmp_path / "run" / "pool.yaml")
    # B is A's near copy: with an active hinge its penalty (10 × (0.2 − 0.02)) puts C first
    assert [tuple(m.genotype.choices.values()) for m in pool.members] == [(ID, ID), member]
    assert pool.members[1].metrics["hinge_active"] == float(active)
    [hinge] = [r for r in log_records(tmp_path / "run") if r["event"] == "hinge"]
    assert hinge["search"] == 1 and hinge["active"] is active and hinge["candidates"] == 2
    assert hinge["terms"][0] == pytest.approx(max(0.0, margin - 2 * 0.02 / 2.02), abs=1e-3)
    assert hinge["zero_terms"] == (1 if active else 2)
    assert ("search 1: the diversity hinge was inactive" in capsys.readouterr().out) is not active
    seeds = [r["seed"] for r in log_records(tmp_path / "run") if r["event"] == "sequential_search"]
    assert seeds == ThreeCandidates.seeds == [0, search_stage.search_seed(0, 1)] and seeds[1] != 0


EVOLVE = ("pool_size=3", "diversity.mode=sequential", "strategy=evolution", "macro.stem=4", "macro.widths=[8]",
          "options={budget: 3, population: 2, sample: 1, members: 2, evaluator: {supernet_steps: 3}}")


@pytest.fixture(scope="module")
def evolved(data, tmp_path_factory) -> tuple[Path, list[str]]:
    """A sequential evolution of three searches, and the trainings its evaluators made."""
    fits: list[str] = []
    fit = CandidateEvaluator._fit
    out = tmp_path_factory.mktemp("evolved") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CandidateEvaluator, "_fit", lambda self, *a, **k: fits.append(k["desc"]) or fit(self, *a, **k))
        search(data, out, *EVOLVE)
    return out, fits


def test_sequential_evolution_trains_one_supernet_and_searches_with_a_seed_each(evolved):
    out, fits = evolved
    pool = load_pool(out / "pool.yaml")
    assert len(pool.members) == 3 and len({m.genotype.key() for m in pool.members}) == 3
    assert fits == ["supernet"]  # trained once for the three searches
    saved = torch.load(out / "supernet.pt", weights_only=True)
    assert len(saved["supernets"]) == 1 and saved["steps"] == 3 and saved["space"] == "lenas"
    assert not list((out / "state").glob("search*/evaluator"))  # the searches share state/evaluator
    records = log_records(out)
    seeds = [r["seed"] for r in records if r["event"] == "sequential_search"]
    assert len(set(seeds)) == 3
    # each search draws its own genotypes; one scored before is a cache hit, not scored again
    children = [{json.dumps(c, sort_keys=True) for c in torch.load(out / "state" / f"search{k}" / "evolution.pt",
                                                                    weights_only=True)["children"]}
                for k in range(3)]
    assert children[0] != children[1] != children[2]
    scored = [json.dumps(r["genotype"], sort_keys=True) for r in records if r["event"] == "scored"]
    assert len(scored) == len(set(scored)) == len(set().union(*children))
    assert [r["search"] for r in records if r["event"] == "hinge"] == [1, 2]


def test_a_sequential_optuna_search_minimizes_disagreement_with_the_members_found(data, tmp_path):
    pytest.importorskip("optuna")
    out = tmp_path / "run"
    search(data, out, *EVOLVE[3:-1], "pool_size=2", "diversity.mode=sequential", "strategy=optuna",
           "options={sampler: nsga2, population: 2, sample: 1, budget: 3, objectives: [score, flops, diversity], "
           "evaluator: {supernet_steps: 3}}")
    assert len({m.genotype.key() for m in load_pool(out / "pool.yaml").members}) == 2
    values = [[t["values"][2] for t in json.loads((out / "state" / f"search{k}" / "optuna_trials.json").read_text())
               ["trials"] if t["state"] == "COMPLETE"] for k in range(2)]
    assert values[0] == [0.0] * 3  # no member yet to differ from
    assert len(values[1]) == 3 and max(values[1]) <= 0 > min(values[1])  # minus disagreement with m0
    assert [r["search"] for r in log_records(out) if r["event"] == "hinge"] == [1]


def test_an_interrupted_sequential_evolution_resumes_to_the_same_pool(data, evolved, tmp_path, monkeypatch):
    killed_in_search_1(data, tmp_path / "cut", monkeypatch, EVOLVE, "child", 1)
    search(data, tmp_path / "cut", resume=True)
    whole, cut = (load_pool(run / "pool.yaml") for run in (evolved[0], tmp_path / "cut"))
    assert [(m.genotype, m.search_score) for m in cut.members] == [(m.genotype, m.search_score) for m in whole.members]
    np.testing.assert_array_equal(cut.matrices["disagreement"], whole.matrices["disagreement"])


# ---------------------------------------------------------------------------------------------
# evaluator.supernet=PATH: a search scores with an earlier search's supernets (issue 17).

def test_a_later_search_reuses_a_saved_supernet_and_refuses_one_that_does_not_match(data, evolved, tmp_path,
                                                                                     monkeypatch):
    saved = evolved[0] / "supernet.pt"
    monkeypatch.setattr(CandidateEvaluator, "_fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fit")))
    # a lone evolution with the sequential run's seed draws what its first search drew
    lone = ("pool_size=1", "diversity.mode=none", *EVOLVE[2:-1],
            "options={budget: 3, population: 2, sample: 1, members: 2, evaluator: {supernet_steps: 3, supernet: "
            + str(saved) + "}}")
    search(data, tmp_path / "b", *lone)
    scores = [{json.dumps(r["genotype"], sort_keys=True): r["score"] for r in log_records(run)
               if r["event"] == "scored" and r.get("search", 0) == 0} for run in (evolved[0], tmp_path / "b")]
    assert scores[0] == scores[1] and len(scores[0]) == 3  # the same draws, scored on the same weights
    assert not (tmp_path / "b" / "supernet.pt").exists()  # saved once, where it was trained
    search(data, tmp_path / "c", *EVOLVE[3:-1], "pool_size=2", "diversity.mode=pool", "strategy=optuna",
           "options={budget: 2, evaluator: {supernet_steps: 3, supernet: " + str(saved) + "}}")
    assert len(load_pool(tmp_path / "c" / "pool.yaml").members) == 2
    for i, (overrides, message) in enumerate((
            (["macro.widths=[16]"], r"supernets of another search: macro .*widths.*\[8\].*this search.*\[16\]"),
            (["options.evaluator.supernet_steps=4"], r"steps 3 \(this search: 4\)"),
            (["seed=1"], "trained on patient"),  # another split: it learned from architecture patients
            (["space=lenas_levels", "macro.widths=[8, 8, 8, 8]"], "space lenas"))):
        with pytest.raises(NasDoseError, match=f"^{saved}: .*{message}") as e:
            search(data, tmp_path / f"x{i}", *EVOLVE[3:-1], "strategy=random", "options.budget=1",
                   "options.evaluator.supernet_steps=3", *overrides, f"options.evaluator.supernet={saved}")
        assert "\n" not in str(e.value)


def test_a_relative_supernet_path_is_recorded_absolute_for_resume_and_ensemble(data, evolved, tmp_path, monkeypatch):
    from nas_dose.ensemble import EnsembleConfig, _supernet_file

    saved = evolved[0] / "supernet.pt"
    monkeypatch.chdir(saved.parent.parent)  # the path is given relative to the working directory
    out = tmp_path / "rel"
    search(data, out, *EVOLVE[3:-1], "pool_size=1", "diversity.mode=none", "strategy=random",
           "options={budget: 1, evaluator: {supernet_steps: 3, supernet: " + f"{saved.parent.name}/supernet.pt" + "}}")
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded path still names the file
    pool = load_pool(out / "pool.yaml")
    assert pool.config["options"]["evaluator"]["supernet"] == str(saved.resolve())
    assert _supernet_file(EnsembleConfig(init="inherit"), pool, out / "pool.yaml") == saved.resolve()
    search(data, out, resume=True)  # from DIR/config.yaml, in another working directory
