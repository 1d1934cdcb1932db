"""`nasdose search … cascade.coarse=RUN`: a search for a cascade's full-resolution stage. Its
networks take the coarse dose as one more channel, run as Refiners, learn on source-grid patches
and are scored on fixed ones; its pool trains into an ensemble of stages; it resumes exactly; a
strategy that cannot search a stage says so."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# the 16³ data set with its 32³ source arrays, and fast training settings, of the cascade's tests
from test_cascade import FAST, nasdose  # noqa: E402
from test_cascade import coarse_data as coarse_data  # noqa: E402, F401
from torch import nn

from nas_dose import ensemble  # noqa: E402
from nas_dose.cascade.patches import CascadeConfig  # noqa: E402
from nas_dose.config import load_config  # noqa: E402
from nas_dose.data.patient import DOSE_SCALE_GY  # noqa: E402
from nas_dose.data.store import open_data  # noqa: E402
from nas_dose.errors import NasDoseError  # noqa: E402
from nas_dose.inference import Cascade, load_predictor  # noqa: E402
from nas_dose.models.factory import load_model, model_from_spec, spec_genotype  # noqa: E402
from nas_dose.models.refiner import REFINER_CHANNELS, Refiner  # noqa: E402
from nas_dose.pool import Candidate, load_pool  # noqa: E402
from nas_dose.runtime import Runtime, RuntimeConfig  # noqa: E402
from nas_dose.search_spaces import get_space  # noqa: E402
from nas_dose.strategies.base import SearchContext, Strategy  # noqa: E402
from nas_dose.strategies.evaluator import CandidateEvaluator  # noqa: E402
from nas_dose.strategies.task import CascadeTask  # noqa: E402

TINY = ["macro.stem=4", "macro.widths=[8]", "cascade.patch=16", "cascade.val_patches=2", "runtime.device=cpu",
        "runtime.threads=1", "pool_size=2", "seed=1"]
BUDGET = {"evolution": ["options.budget=3", "options.population=2", "options.sample=1"],
          "random": ["options.budget=3"], "optuna": ["options.budget=3"],
          "differentiable": ["options.epochs=1", "options.steps_per_epoch=2", "options.candidates=3"]}
STEPS = ["options.evaluator.supernet_steps=4"]


@pytest.fixture(scope="module")
def coarse(coarse_data, tmp_path_factory) -> Path:
    """The coarse stage: a small U-Net trained on the 16³ grid."""
    out = tmp_path_factory.mktemp("coarse") / "run"
    assert nasdose("train", "--data", coarse_data, "--out", out, *FAST) == 0
    return out


def search(data: Path, out: Path, *overrides: str, resume: bool = False) -> int:
    return nasdose("search", "--data", data, "--out", out, *(["--resume"] if resume else []), "--quiet", *overrides)


def log(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "seconds")}
            for line in (out / "search_log.jsonl").read_text().splitlines()]


def test_patch_scores_are_the_dose_score_of_fixed_source_grid_patches(coarse_data, coarse):
    """A stage that adds nothing scores its coarse input's error on each patient's fixed patches."""
    task = CascadeTask(coarse_data, CascadeConfig(coarse=str(coarse), patch=16, val_patches=2), "train",
                       ["pt_5", "pt_6"], Runtime(RuntimeConfig(device="cpu", threads=1)), 0)
    ctx = SearchContext(get_space("lenas"), {}, coarse_data, Runtime(RuntimeConfig(device="cpu")), 0,
                        ["pt_1", "pt_2", "pt_3", "pt_4"], ["pt_5"], ["pt_6"], task=task)
    assert ctx.input_shape() == (1, REFINER_CHANNELS, 16, 16, 16) and ctx.cascade["coarse"] == str(coarse.resolve())
    stage = ctx.wrap(nn.Sequential(nn.Conv3d(REFINER_CHANNELS, 1, 1)))
    errors, preds = ctx.evaluate(stage, ["pt_5", "pt_6"])
    targets, masks = ctx.targets(["pt_6", "pt_5"])
    for pid in ("pt_5", "pt_6"):
        items = [task.fixed[i] for i in range(len(task.fixed)) if task.fixed[i]["id"] == pid]
        coarse_in = [(it["input"][-1] * it["mask"][0]).numpy() for it in items]
        expected = [np.abs(c - it["target"][0].numpy()).sum() / it["mask"].sum().item() * DOSE_SCALE_GY
                    for c, it in zip(coarse_in, items)]
        assert len(items) == 2 and errors[pid] == pytest.approx(np.mean(expected), rel=1e-5)
        assert preds[pid].shape == targets[pid].shape == masks[pid].shape == (2, 16, 16, 16)
        np.testing.assert_allclose(preds[pid], np.clip(coarse_in, 0, None), atol=1e-6)
    # pt_6 (validation) is refined from the coarse model's prediction, pt_5 (train) from the
    # degraded reference: a fixed draw, the same in a second task
    assert set(task.doses) == {"pt_6"}
    again = CascadeTask(coarse_data, task.cfg, "train", ["pt_5", "pt_6"], Runtime(RuntimeConfig(device="cpu")), 0)
    assert torch.equal(again.fixed[0]["input"], task.fixed[0]["input"])
    # training patches: a new draw per seed, the same for the same seed
    a, b, c = (ctx.dataset(["pt_1"], train=True, seed=s)[0]["input"] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_stage_search_makes_a_pool_of_stages_that_trains_into_an_ensemble_of_stages(coarse_data, coarse,
                                                                                      tmp_path, capsys):
    out = tmp_path / "search"
    assert search(coarse_data, out, "strategy=evolution", f"cascade.coarse={coarse}", *TINY, *BUDGET["evolution"],
                  *STEPS) == 0
    pool = load_pool(out / "pool.yaml")
    assert pool.cascade is not None and pool.cascade["coarse"] == str(coarse.resolve()) and pool.cascade["patch"] == 16
    assert "patch proxy" in pool.predictions
    assert [r for r in log(out) if r["event"] == "cascade_stage"][0]["scored_on"].endswith(
        "(a patch proxy of the source-grid score)")
    for m in pool.members:
        assert m.genotype.macro["in_channels"] == REFINER_CHANNELS and 0 < m.search_score < 70
        stage = model_from_spec({"genotype": spec_genotype(m.genotype, True), "refiner": True})
        x = torch.rand(1, REFINER_CHANNELS, 16, 16, 16)
        assert isinstance(stage, Refiner) and torch.equal(stage(x), x[:, -1:])  # starts from the coarse dose

    # `nasdose ensemble` trains the members as stages of the same cascade without being told
    ens = tmp_path / "ens"
    train = ["train.epochs=1", "train.steps_per_epoch=2", "train.data.augment.enabled=false", "runtime.device=cpu",
             "runtime.threads=1", "plots=0", "--quiet"]
    assert nasdose("ensemble", out / "pool.yaml", "--data", coarse_data, "--out", ens, *train) == 0
    saved = load_config(ensemble.Config, ens / "config.yaml")
    assert saved.train.cascade.coarse == str(coarse.resolve()) and saved.train.cascade.patch == 16
    for m in pool.members:
        model, _ = load_model(ens / "members" / m.name)
        first = next(m for m in model.modules() if isinstance(m, nn.Conv3d))
        assert isinstance(model, Refiner) and first.in_channels == REFINER_CHANNELS
    runtime = Runtime(RuntimeConfig(device="cpu", threads=1))
    with open_data(coarse_data) as d:
        predictor = load_predictor(ens / "ensemble.yaml", runtime, d.grid)
        assert isinstance(predictor, Cascade)
        (pid, dose), = predictor.predict(d, d.ids("validation"), runtime)
        assert dose.shape == (32, 32, 32) and not dose[~d.source_mask(pid)].any()
    # a member trained alone needs its coarse stage too
    assert nasdose("train", "--data", coarse_data, "--out", tmp_path / "alone", "epochs=1", "runtime.device=cpu",
                   f"model.genotype={out / 'genotypes' / 'm0.yaml'}") == 1
    assert "searched for a cascade's full-resolution stage" in capsys.readouterr().err
    # a different coarse stage is refused, naming the pool's
    other = load_config(ensemble.Config, overrides=[f"train.cascade.coarse={tmp_path}"])
    with pytest.raises(NasDoseError, match=f"searched as stages refining {coarse.resolve()}, but"):
        ensemble.run(other, ensemble.Inputs(out / "pool.yaml", coarse_data), tmp_path / "other")


@pytest.mark.parametrize("strategy", ["random", "optuna", "differentiable"])
def test_every_evaluator_strategy_and_the_differentiable_one_search_stages(coarse_data, coarse, tmp_path, strategy):
    if strategy == "optuna":
        pytest.importorskip("optuna")
    out = tmp_path / strategy
    steps = [] if strategy == "differentiable" else STEPS
    assert search(coarse_data, out, f"strategy={strategy}", f"cascade.coarse={coarse}", *TINY, *BUDGET[strategy],
                  *steps) == 0
    pool = load_pool(out / "pool.yaml")
    assert pool.cascade is not None and len(pool.members) == 2
    assert all(m.genotype.macro["in_channels"] == REFINER_CHANNELS and 0 < m.search_score < 70 for m in pool.members)


def test_an_interrupted_stage_search_resumes_to_the_uninterrupted_one(coarse_data, coarse, tmp_path, monkeypatch):
    args = ["strategy=evolution", f"cascade.coarse={coarse}", *TINY, "options.budget=4", "options.population=2",
            "options.sample=1", "options.evaluator.supernet_steps=4"]
    assert search(coarse_data, tmp_path / "whole", *args) == 0
    score = CandidateEvaluator._score
    calls = []

    def cut(self: CandidateEvaluator, g: Any) -> Candidate:
        calls.append(g)
        if len(calls) == 3:
            raise KeyboardInterrupt  # two candidates scored and cached, the third cut short
        return score(self, g)

    monkeypatch.setattr(CandidateEvaluator, "_score", cut)
    assert search(coarse_data, tmp_path / "cut", *args) != 0  # interrupted
    assert len(calls) == 3 and not (tmp_path / "cut" / "pool.yaml").exists()
    monkeypatch.setattr(CandidateEvaluator, "_score", score)
    assert search(coarse_data, tmp_path / "cut", *args, resume=True) == 0
    cut, whole = (load_pool(tmp_path / run / "pool.yaml") for run in ("cut", "whole"))
    assert [(m.name, m.genotype, m.search_score) for m in cut.members] == \
        [(m.name, m.genotype, m.search_score) for m in whole.members]
    assert all(np.array_equal(cut.matrices[k], whole.matrices[k], equal_nan=True) for k in whole.matrices)
    assert cut.cascade == whole.cascade and cut.predictions == whole.predictions
    assert log(tmp_path / "cut") == log(tmp_path / "whole")


@dataclass
class _OwnConfig:
    pass


class _Own(Strategy):
    """A plug-in strategy that builds its networks itself: it cannot search a stage."""

    Config = _OwnConfig

    def run(self, ctx: SearchContext) -> list[Candidate]:
        raise AssertionError("not reached")


def test_a_strategy_that_cannot_search_a_stage_refuses_before_any_work(coarse_data, coarse, tmp_path, capsys):
    for extra, message in (
            (["strategy=test_stage_search:_Own"],
             "strategy 'test_stage_search:_Own' cannot search a cascade's full-resolution stage"),
            (["strategy=differentiable", "diversity.mode=sequential"], "with diversity.mode=sequential"),
            (["macro.in_channels=10"], "config key 'macro.in_channels': a cascade's stage takes 11 channels")):
        out = tmp_path / "refused"
        assert search(coarse_data, out, f"cascade.coarse={coarse}", "runtime.device=cpu", *extra) == 1
        assert message in capsys.readouterr().err and not out.exists()
