"""Conditioned pools and students (issue 18): `nasdose ensemble` with `conditioning: film` trains
conditioned members and chooses them on every plan of each validation patient; `nasdose distill`
teaches a conditioned student from a conditioned ensemble, the teacher cached per (patient, plan).
Tiny: 16³ phantoms with 4 plans each, two small LENAS members, a few steps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distill_cli import GENOTYPES  # two small LENAS genotypes

from nas_dose import ensemble
from nas_dose.config import ConfigError, load_config
from nas_dose.data.dataset import measured_items, plan_items, plan_key
from nas_dose.data.store import open_data
from nas_dose.distill import distill as distill_stage
from nas_dose.distill.losses import DistillObjective, FeatureTap, HintConfig
from nas_dose.distill.teacher import PlanTeacherDataset
from nas_dose.ensemble import EnsembleConfig, Inputs
from nas_dose.errors import NasDoseError
from nas_dose.inference import (
    conditioned_on,
    load_at_measured,
    load_ensemble,
    official_scores,
    predict_patient,
    predict_plans,
    score_plans,
)
from nas_dose.io import load_checkpoint, load_json
from nas_dose.models.conditioning import Conditioned, Preset
from nas_dose.models.factory import ModelConfig, build_model, load_model
from nas_dose.pool import MATRICES, Pool, PoolMember, load_pool, save_pool
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.search_spaces import get_space, load_genotype
from nas_dose.selection import ValidationPredictions, leave_one_patient_out
from nas_dose.training import TrainConfig

SETTINGS = ["train.epochs=2", "train.steps_per_epoch=2", "train.optim.lr=0.003", "train.data.augment.enabled=false",
            "runtime.device=cpu", "runtime.threads=1", "plots=0", "selection.max_size=2",
            "conditioning=film", "train.data.plans=true"]


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory) -> Path:
    space = get_space("lenas")
    members = [PoolMember(name, space.genotype(choices, {"stem": 4, "widths": [8, 8]}), 1.0)
               for name, choices in GENOTYPES.items()]
    path = tmp_path_factory.mktemp("pool") / "pool.yaml"
    save_pool(path, Pool("lenas", "hand", 0, members, {k: np.zeros((2, 2)) for k in MATRICES}))
    return path


@pytest.fixture(scope="module")
def conditioned_ensemble(tmp_path_factory, plan_data, pool_file) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cens") / "run"
    cfg = load_config(EnsembleConfig, overrides=[*SETTINGS, "selection.combination=weighted"])
    return out, ensemble.run(cfg, Inputs(pool_file, plan_data), out)


def test_members_are_conditioned_and_chosen_on_every_plan(conditioned_ensemble, plan_data):
    out, metrics = conditioned_ensemble
    for name in GENOTYPES:
        spec = load_checkpoint(out / "members" / name / "best.pt")["model_config"]
        assert spec["conditioning"]["names"] == ["oar", "hi"]
        assert load_checkpoint(out / "members" / name / "best.pt")["config"]["data"]["plans"] is True
    with open_data(plan_data) as d:
        keys = [item.key for item in plan_items(d, d.ids("validation"))]
    assert keys == [plan_key(pid, k) for pid in ("pt_7", "pt_8") for k in range(4)]
    with open_data(out / "members" / "a" / "validation.h5") as cache:
        assert cache.ids() == keys
    assert metrics["patients"] == ["pt_7", "pt_8"]
    assert set(metrics["validation_in_sample"]["per_patient"]) == set(keys)
    loo = metrics["validation_leave_one_patient_out"]
    assert set(loo["weights"]) == set(keys) and loo["dose_score"] > 0
    # a patient's plans are left out together: they get the same weights
    for pid in ("pt_7", "pt_8"):
        rows = [loo["weights"][plan_key(pid, k)] for k in range(4)]
        assert all(r == pytest.approx(rows[0]) for r in rows)
    ens = load_ensemble(out / "ensemble.yaml")
    assert conditioned_on(ens) == ("oar", "hi")
    assert metrics["validation_in_sample"]["dose_score"] <= metrics["best_member"]["dose_score"] + 1e-6


def test_the_saved_ensemble_predicts_each_plan_as_it_was_scored(conditioned_ensemble, plan_data):
    out, _ = conditioned_ensemble
    ens = load_ensemble(out / "ensemble.yaml")
    runtime = Runtime(RuntimeConfig(device="cpu"))
    with open_data(plan_data) as d, open_data(out / "validation.h5") as saved:
        for item in plan_items(d, ["pt_8"])[::3]:
            dose = predict_patient(Preset(ens, item.values.tolist()), d.read(item.pid), runtime)
            np.testing.assert_allclose(dose, saved.read_dose(item.key), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def measured_ensemble(tmp_path_factory, resampled_data, pool_file) -> tuple[Path, dict]:
    """Conditioned members on a resampled data set of one plan per patient (as OpenKBP)."""
    out = tmp_path_factory.mktemp("mens") / "run"
    cfg = load_config(EnsembleConfig, overrides=[*SETTINGS, "selection.combination=weighted"])
    return out, ensemble.run(cfg, Inputs(pool_file, resampled_data), out)


def test_on_a_resampled_data_set_every_score_is_official_at_measured_preferences(measured_ensemble,
                                                                                 resampled_data):
    """Each patient is asked for its own measured preferences and scored as OpenKBP does, on the
    32³ source grid, as `nasdose train` scores a conditioned run there, not on the 16³ grid."""
    out, metrics = measured_ensemble
    runtime = Runtime(RuntimeConfig(device="cpu"))
    assert metrics["preferences"] == "measured" and "plans" not in metrics
    with open_data(resampled_data) as d:
        ids = d.ids("validation")
        assert metrics["patients"] == ids and set(metrics["validation_in_sample"]["per_patient"]) == set(ids)
        whole = load_at_measured(out / "ensemble.yaml", runtime)
        official = official_scores(whole, d, ids, runtime)
        coarse = score_plans(d, measured_items(d, ids), predict_plans(whole.model, d, measured_items(d, ids), runtime))
        members = {name: official_scores(load_at_measured(out / "members" / name, runtime), d, ids, runtime)
                   for name in GENOTYPES}
    in_sample = metrics["validation_in_sample"]
    assert in_sample["dose_score"] == pytest.approx(official.dose_score, rel=1e-4)
    assert in_sample["dvh_score"] == pytest.approx(official.dvh_score, rel=1e-4)
    assert abs(coarse.dose_score - official.dose_score) > 1e-3  # the 16³ score is another number
    for name, scores in members.items():
        assert metrics["members"][name]["dose_score"] == pytest.approx(scores.dose_score, rel=1e-4)
    best = metrics["best_member"]
    assert best["dose_score"] == pytest.approx(min(s.dose_score for s in members.values()), rel=1e-4)
    assert set(metrics["validation_leave_one_patient_out"]["weights"]) == set(ids)
    with open_data(out / "members" / "a" / "validation.h5") as cache:
        assert cache.ids() == ids  # each patient once, on the data set's grid (selection's coarse score)
        assert cache.grid == 16


def test_leave_one_patient_out_groups_a_patients_entries():
    rng = np.random.default_rng(0)
    entries = [(f"p{i}#plan{k}", rng.random(8), np.ones(8, bool), [rng.random(8), rng.random(8)])
               for i in range(3) for k in range(2)]
    vp = ValidationPredictions.from_patients(["a", "b"], entries)
    seen: list[list[str]] = []

    def record(sub: ValidationPredictions) -> np.ndarray:
        seen.append(sub.ids)
        return np.array([len(seen), 0.0])

    rows = leave_one_patient_out(vp, record, [f"p{i}" for i in range(3) for _ in range(2)])
    assert seen == [["p1#plan0", "p1#plan1", "p2#plan0", "p2#plan1"], ["p0#plan0", "p0#plan1", "p2#plan0", "p2#plan1"],
                    ["p0#plan0", "p0#plan1", "p1#plan0", "p1#plan1"]]
    np.testing.assert_array_equal(rows[:, 0], [1, 1, 2, 2, 3, 3])


def test_conditioning_needs_plans_and_no_cascade():
    with pytest.raises(ConfigError, match="train.data.plans=true"):
        load_config(EnsembleConfig, overrides=["conditioning=film"])
    with pytest.raises(ConfigError, match="cascade"):
        load_config(EnsembleConfig, overrides=["conditioning=film", "train.data.plans=true",
                                               "train.cascade.coarse=somewhere"])
    with pytest.raises(ConfigError, match="film"):
        load_config(EnsembleConfig, overrides=["conditioning=adain", "train.data.plans=true"])


def test_a_pool_of_stages_cannot_be_conditioned(tmp_path):
    """A pool searched for a cascade's stage makes its members stages after the config was
    validated: the ensemble refuses conditioning there too, naming the pool."""
    cfg = load_config(EnsembleConfig, overrides=["conditioning=film", "train.data.plans=true"])
    pool = Pool("lenas", "evolution", 0, [], {}, "", {}, cascade={"coarse": str(tmp_path / "coarse")})
    with pytest.raises(NasDoseError, match="pool.yaml: .*stages refining .*cannot be conditioned"):
        ensemble._pool_cascade(cfg, pool, tmp_path / "pool.yaml")


DISTILL = ["train.epochs=2", "train.steps_per_epoch=2", "train.optim.lr=0.003", "train.data.augment.enabled=false",
           "runtime.device=cpu", "runtime.threads=1", "latency.size=16", "latency.runs=1", "train.data.plans=true"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, conditioned_ensemble, plan_data) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cdistill") / "run"
    cfg = load_config(distill_stage.Config, overrides=[*DISTILL, "student=unet3d:widths=4,8"])
    return out, distill_stage.run(cfg, distill_stage.Inputs(conditioned_ensemble[0] / "ensemble.yaml", plan_data), out)


def test_a_conditioned_teacher_teaches_a_conditioned_student_per_plan(distilled, conditioned_ensemble, plan_data):
    out, metrics = distilled
    teacher = load_ensemble(conditioned_ensemble[0] / "ensemble.yaml")
    runtime = Runtime(RuntimeConfig(device="cpu"))
    with open_data(plan_data) as d, open_data(out / "teacher.h5") as cache:
        items = plan_items(d, d.ids("train") + d.ids("validation"))
        assert cache.ids() == [i.key for i in items] and len(items) == 8 * 4
        item = items[5]  # the teacher's prediction for that plan, asked for its preferences
        expected = predict_patient(Preset(teacher, item.values.tolist()), d.read(item.pid), runtime)
        np.testing.assert_allclose(cache.read_dose(item.key), expected, rtol=1e-4, atol=1e-4)
    for run in ("student", "baseline"):
        model, meta = load_model(out / run)
        assert isinstance(model, Conditioned) and meta["config"]["data"]["plans"] is True
    rows = {r["name"]: r for r in metrics["rows"]}
    assert len(rows) == 4 and all(np.isfinite(r["dose_score"]) and r["dose_score"] > 0 for r in rows.values())
    assert metrics["training_patients"]["unlabeled"] == 0
    assert "conditioned on preferences" in (out / "comparison.md").read_text()


def test_the_student_draws_a_plan_with_its_teachers_prediction(distilled, plan_data):
    out, _ = distilled
    dataset = PlanTeacherDataset(plan_data, "train", out / "teacher.h5", seed=0)
    with open_data(out / "teacher.h5") as cache:
        for epoch in range(3):
            item = dataset[(1, epoch)]
            plan = dataset.plan(1, epoch)
            np.testing.assert_array_equal(item["preferences"].numpy(), dataset.values[1][plan])
            np.testing.assert_allclose(item["teacher"][0].numpy(),
                                       cache.read_dose(plan_key(dataset.ids[1], plan)) / np.float32(70), rtol=1e-6)


def test_conditioned_teacher_and_plans_go_together(conditioned_ensemble, plan_data, tmp_path):
    teacher = conditioned_ensemble[0] / "ensemble.yaml"
    cfg = load_config(distill_stage.Config, overrides=[*DISTILL, "student=unet3d:widths=4,8", "train.data.plans=false"])
    with pytest.raises(NasDoseError, match="train.data.plans=true"):
        distill_stage.run(cfg, distill_stage.Inputs(teacher, plan_data), tmp_path / "x")


def test_a_conditioned_student_learns_hints_and_exports_with_its_preferences(conditioned_ensemble, plan_data,
                                                                             tmp_path):
    """Hints from the teacher's member asked for each plan's preferences; student.pt2 takes the
    preferences as its second input and gives torch's dose at two settings."""
    teacher = conditioned_ensemble[0] / "ensemble.yaml"
    out = tmp_path / "run"
    cfg = load_config(distill_stage.Config, overrides=[*DISTILL, "student=unet3d:widths=4,8", "baseline=false",
                                                       "hint.weight=0.5", "hint.levels=encoder_decoder",
                                                       "export=true"])
    metrics = distill_stage.run(cfg, distill_stage.Inputs(teacher, plan_data), out)
    log = [json.loads(line) for line in (out / "student" / "log.jsonl").read_text().splitlines()]
    hints = [r["loss_hint"] for r in log if "loss_hint" in r]
    assert hints and all(np.isfinite(h) and h > 0 for h in hints)
    assert metrics["export"] == str(out / "student.pt2")
    program = torch.export.load(str(out / "student.pt2")).module()
    student, _ = load_model(out / "student")
    x = torch.randn(1, 10, 16, 16, 16)
    doses = []
    for values in ([0.1, 0.05], [0.9, 0.4]):
        p = torch.tensor([values])
        with torch.no_grad():
            torch.testing.assert_close(program(x, p), student.eval()(x, p), atol=1e-5, rtol=1e-4)
            doses.append(program(x, p))
    assert (doses[0] - doses[1]).abs().max() > 0  # trained FiLM heads: the setting changes the dose


def test_a_conditioned_teachers_searched_student_is_searched_conditioned(distilled, conditioned_ensemble, plan_data,
                                                                         tmp_path):
    """`--student search:…` with a conditioned teacher searches conditioned networks (scored on
    every plan at its own preferences), and the student trained is the genotype chosen, conditioned."""
    out = tmp_path / "run"
    cfg = load_config(distill_stage.Config, overrides=[
        *DISTILL, "student=search:max_params=1000000:strategy=random:budget=2", "baseline=false",
        "student_search={space: lenas, macro: {stem: 4, widths: [8]}, "
        "options: {evaluator: {supernet_steps: 2, lr: 0.01}}}"])
    distill_stage.run(cfg, distill_stage.Inputs(conditioned_ensemble[0] / "ensemble.yaml", plan_data,
                                                distilled[0] / "teacher.h5"), out)
    search = out / "student_search"
    assert load_pool(search / "pool.yaml").conditioning == "film"
    assert load_json(search / "metrics.json")["conditioning"] == "film"
    model, meta = load_model(out / "student")
    assert isinstance(model, Conditioned) and meta["config"]["model"]["conditioning"] == "film"
    assert load_genotype(meta["config"]["model"]["genotype"]) == load_genotype(search / "student.yaml")


def test_hints_ask_a_conditioned_teacher_for_the_batchs_preferences(conditioned_ensemble):
    teacher = load_ensemble(conditioned_ensemble[0] / "ensemble.yaml")
    member = teacher.members[0]
    objective = DistillObjective(Path("unused.h5"), hint=HintConfig(weight=1.0, levels="encoder"),
                                 hint_teacher=member)
    objective.grid = 16
    student = build_model(ModelConfig(kwargs={"widths": [4, 8]}, conditioning="film"))
    objective.bind(student, Runtime(RuntimeConfig(device="cpu")), load_config(TrainConfig, overrides=[]))
    torch.manual_seed(0)
    x = torch.randn(2, 10, 16, 16, 16)
    prefs = torch.tensor([[0.1, 0.05], [0.9, 0.4]])
    got = objective.teacher_features({"input": x, "preferences": prefs})
    tap = FeatureTap(member, [t for _, t, _ in objective.hint.pairs(student, member)], always=True)
    with torch.no_grad():
        member(x, prefs)
    for g, expected in zip(got, tap.take(), strict=True):
        torch.testing.assert_close(g, expected)
