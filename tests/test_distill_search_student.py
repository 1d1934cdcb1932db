"""A student sized for a budget: `--student search:max_params=N` searches the distillation's data
set for the most accurate genotype within the limit, records it, trains it (and its baseline
twin), and reuses the finished search on --resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nas_dose import cli
from nas_dose.config import ConfigError, from_dict
from nas_dose.distill.student_search import search_config
from nas_dose.errors import NasDoseError
from nas_dose.io import load_json, load_yaml
from nas_dose.models.spec import StudentSearch, resolve_student, search_request
from nas_dose.runtime import RuntimeConfig
from nas_dose.search_spaces import count_params, get_space, load_genotype
from nas_dose.strategies import search as search_stage
from nas_dose.strategies.base import get_strategy

MACRO = {"stem": 4, "widths": [8]}
TINY = ["train.epochs=1", "train.steps_per_epoch=2", "train.data.augment.enabled=false", "runtime.device=cpu",
        "runtime.threads=1", "latency.size=16", "latency.runs=1"]
SEARCH = ("student_search={space: lenas, macro: {stem: 4, widths: [8]}, options: {budget: 6, "
          "evaluator: {supernet_steps: 3}}}")


@pytest.mark.parametrize("spec, expected", [
    ("search:max_flops=3e9", StudentSearch({"max_flops": 3e9})),
    ("search:max_params=20000:max_latency_ms=2.5:strategy=random:budget=8",
     StudentSearch({"max_params": 20000.0, "max_latency_ms": 2.5}, "random", 8)),
    ("unet3d:widths=4,8", None),
])
def test_search_specs(spec, expected):
    assert search_request(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("search", "needs a limit"),
    ("search:strategy=random", "needs a limit"),
    ("search:max_flops=-1", "max_flops must be a positive number"),
    ("search:max_flops=lots", "max_flops must be a positive number"),
    ("search:max_flops=1e9:budget=0", "budget must be a whole number"),
    ("search:max_flops=1e9:width=2", "unknown option 'width'"),
])
def test_bad_search_specs_name_the_spec(spec, message):
    with pytest.raises(NasDoseError, match=f"--student '{spec}': .*{message}"):
        search_request(spec)


def test_the_search_behind_a_spec():
    def config(spec, section=None):
        return search_config(search_request(spec), section or {}, 3, RuntimeConfig(device="cpu"), "train", "validation")

    cfg = config("search:max_flops=3e9:max_params=5e4")
    assert (cfg.space, cfg.strategy, cfg.pool_size, cfg.diversity.mode, cfg.seed) == (
        "lenas_levels", "evolution", 1, "none", 3)
    assert (cfg.cost, cfg.pool_max_cost) == ("flops", 3e9)  # the first limit
    assert cfg.options["evaluator"] == {"supernet_steps": 200, "max_flops": 3e9, "max_params": 50000}
    cfg = config("search:max_latency_ms=5:strategy=random:budget=4", {"options": {"evaluator": {"lr": 0.01}}})
    assert (cfg.strategy, cfg.cost) == ("random", "latency")
    assert cfg.options == {"budget": 4, "evaluator": {"supernet_steps": 200, "lr": 0.01, "max_latency_ms": 5.0}}
    assert config("search:max_flops=1e9:strategy=differentiable").options == {}
    with pytest.raises(ConfigError, match="keeps one limit"):
        config("search:max_flops=1e9:max_params=1e4:strategy=differentiable")
    with pytest.raises(ConfigError, match="strategy 'differentiable' has no budget"):
        config("search:max_flops=1e9:strategy=differentiable:budget=4")
    # a strategy named in the section keeps DEFAULTS' options it has, and its own (a random search
    # has no population; a differentiable one no budget)
    cfg = config("search:max_flops=1e9", {"strategy": "random", "options": {"budget": 5}})
    assert cfg.options == {"budget": 5, "evaluator": {"supernet_steps": 200, "max_flops": 1e9}}
    from_dict(get_strategy("random").Config, cfg.options, prefix="options")  # as `nasdose search` resolves them
    cfg = config("search:max_latency_ms=5", {"strategy": "differentiable", "options": {"epochs": 2}})
    assert cfg.options == {"epochs": 2}
    from_dict(get_strategy("differentiable").Config, cfg.options, prefix="options")


def test_the_models_layer_does_not_search(tmp_path):
    with pytest.raises(NasDoseError, match="found by `nasdose distill`"):
        resolve_student("search:max_flops=1e9", tmp_path)


def test_the_student_is_the_best_candidate_within_the_budget(data, train_tiny, tmp_path, monkeypatch):
    teacher = train_tiny(data, tmp_path / "teacher")
    space = get_space("lenas")
    rng = np.random.RandomState(0)
    sizes = sorted(count_params(space.build(space.sample(rng, MACRO))) for _ in range(20))
    limit = sizes[len(sizes) // 2]
    out = tmp_path / "run"
    argv = ["distill", teacher, "--student", f"search:max_params={limit}:strategy=random", "--data", data,
            "--out", out, *TINY, SEARCH]
    assert cli.main([str(a) for a in argv]) == 0
    folder = out / "student_search"
    scored = [r for r in map(json.loads, (folder / "search_log.jsonl").read_text().splitlines())
              if r["event"] == "scored"]
    within = [r for r in scored if r["params"] <= limit]
    assert len(scored) == 6 and 0 < len(within) < 6  # the limit bites
    assert all(r["score"] == float("inf") for r in scored if r["params"] > limit)  # rejected unscored
    best = min(within, key=lambda r: r["score"])
    chosen = load_genotype(folder / "student.yaml")
    assert chosen.to_dict() == best["genotype"]
    record = load_json(folder / "metrics.json")
    assert record["limits"] == {"max_params": limit} and record["search_score"] == best["score"]
    assert record["metrics"]["params"] == best["params"] <= limit
    # the student and its baseline twin are that genotype
    assert load_genotype(out / "student_genotype.yaml") == chosen
    for run in ("student", "baseline"):
        assert load_yaml(out / run / "config.yaml")["model"]["genotype"] == str(out / "student_genotype.yaml")
    metrics = load_json(out / "metrics.json")
    assert metrics["student_search"] == record
    assert [r["params"] for r in metrics["rows"] if r["name"].startswith("student")] == \
        [best["params"]] * 2
    # resumed: the finished search is reused, not run again
    monkeypatch.setattr(search_stage, "run", lambda *a, **k: pytest.fail("searched again"))
    assert cli.main([str(a) for a in argv + ["--resume"]]) == 0
    assert load_json(out / "metrics.json")["student_search"] == record


def test_the_table_names_a_searched_students_width_and_depth():
    from nas_dose.distill.report import architecture

    genotype = {"space": "lenas_levels", "macro": {"stem": 8, "widths": [8, 16, 32, 64]},
                "choices": {"width": 50, "depth": 2}}
    assert architecture({"genotype": genotype}) == \
        "lenas_levels genotype, stem 8, widths 8,16,32,64, width 50 %, depth 2"


def test_an_interrupted_student_search_is_resumed_under_its_config(data, train_tiny, tmp_path, monkeypatch):
    """The run's config.yaml is written before the student's search: a run stopped during the
    search is resumed only with the same student (and replaced whole by --force)."""
    from nas_dose.distill import distill as distill_module

    teacher = train_tiny(data, tmp_path / "teacher")
    out = tmp_path / "run"

    def interrupted(*args, **kwargs):
        (out / "student_search").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_module, "find_student", interrupted)
    argv = ["distill", teacher, "--data", data, "--out", out, *TINY, SEARCH]
    assert cli.main([str(a) for a in [*argv, "--student", "search:max_params=5000"]]) not in (0, 1)  # interrupted
    assert load_yaml(out / "config.yaml")["student"] == "search:max_params=5000"
    assert cli.main([str(a) for a in [*argv, "--student", "search:max_params=9000", "--resume"]]) == 1  # refused
