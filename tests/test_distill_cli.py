"""`nasdose distill` end to end on a tiny synthetic set and a tiny ensemble of two briefly
trained LENAS genotypes: files, table, predict and export of the student, exact resume, and
bad inputs (one line naming the file, exit 1); ONNX exports of the student and of its teacher
ensemble checked in onnxruntime."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nas_dose import cli
from nas_dose.config import load_config
from nas_dose.data.store import open_data
from nas_dose.distill import distill as distill_stage
from nas_dose.distill.report import BASELINE, MIN_TEACHER_LEAD, TEACHER, Row, idle_teacher
from nas_dose.inference import load_model_or_ensemble
from nas_dose.io import load_checkpoint, load_json, load_yaml, save_yaml
from nas_dose.models.factory import build_model, load_model
from nas_dose.runtime import seed_everything
from nas_dose.search_spaces import get_space, save_genotype
from nas_dose.training import TrainConfig, train_model

GENOTYPES = {
    "a": {"down.op1": "conv", "down.op2": "identity", "down.connect": "identity", "down.down": "max_pool",
          "up.op1": "conv", "up.op2": "identity", "up.connect": "identity", "up.up": "up_interpolate"},
    "b": {"down.op1": "dep_conv", "down.op2": "identity", "down.connect": "none", "down.down": "avg_pool",
          "up.op1": "identity", "up.op2": "dep_conv", "up.connect": "identity", "up.up": "up_conv"},
}
# 2 epochs of 2 steps, one thread, a 16³ latency volume timed once: seconds, not minutes.
TINY = ["train.epochs=2", "train.steps_per_epoch=2", "train.optim.lr=0.003", "train.log_every=1",
        "train.checkpoint_every=2", "runtime.device=cpu", "runtime.threads=1", "latency.size=16", "latency.runs=1"]
STUDENT = "unet3d:widths=4,8"


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, data) -> Path:
    """ensemble.yaml over two tiny LENAS members, 4 steps of training each, weights 0.7 / 0.3."""
    root = tmp_path_factory.mktemp("ensemble")
    members = []
    for i, (name, choices) in enumerate(GENOTYPES.items()):
        folder = root / "members" / name
        save_genotype(folder / "genotype.yaml", get_space("lenas").genotype(choices, {"stem": 4, "widths": [8, 8]}))
        cfg = load_config(TrainConfig, overrides=[
            "model.name=lenas", f"model.genotype={folder / 'genotype.yaml'}", "epochs=2", "steps_per_epoch=2",
            "optim.lr=0.003", "data.augment.enabled=false", "runtime.device=cpu", "runtime.threads=1", f"seed={i}"])
        seed_everything(i)
        train_model(build_model(cfg.model), cfg, data, folder)
        members.append({"name": name, "genotype": f"members/{name}/genotype.yaml",
                        "checkpoint": f"members/{name}/best.pt", "weight": 0.7 - 0.4 * i})
    save_yaml(root / "ensemble.yaml", {"format": "nasdose-ensemble", "version": 1, "tta": False, "members": members})
    return root / "ensemble.yaml"


@pytest.fixture
def nasdose():
    """The `nasdose` command line, called in-process."""
    return lambda *args: cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory, data, ensemble) -> tuple[Path, str]:
    """Everything on: hints from the heavier member, a trained discriminator, baseline, export."""
    out = tmp_path_factory.mktemp("distill") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
        rc = cli.main(["distill", str(ensemble), "--student", STUDENT, "--data", str(data), "--out", str(out),
                       "--export", *TINY, "hint.weight=0.5", "adversarial.weight=0.1"])
    assert rc == 0
    return out, stdout.getvalue()


def test_files_table_and_metrics(run):
    out, printed = run
    for f in ("teacher.h5", "teacher.json", "config.yaml", "comparison.md", "metrics.json", "student.pt2",
              "student/best.pt", "student/checkpoints/last.pt", "baseline/best.pt"):
        assert (out / f).is_file(), f
    metrics = load_json(out / "metrics.json")
    rows = {r["name"]: r for r in metrics["rows"]}
    student, teacher = rows["student (distilled)"], rows["ensemble (teacher, 2 members)"]
    single = next(r for name, r in rows.items() if name.startswith("best single member"))
    baseline = rows["student arch., no distillation"]
    assert len(rows) == 4 and metrics["patients"] == ["pt_7", "pt_8"] and metrics["teacher_recomputed"] is True
    for r in rows.values():
        assert r["dose_score"] > 0 and r["dvh_score"] > 0 and r["flops"] > 0 and r["cpu_latency_s"] > 0
        assert r["checkpoint_bytes"] > 0
    # the student: the small U-Net; the ensemble: both members (about twice a member's size)
    student_params = sum(p.numel() for p in load_model(out / "student")[0].parameters())
    assert student["params"] == baseline["params"] == student_params
    assert student["params"] < single["params"] < teacher["params"]
    assert teacher["flops"] > single["flops"]
    assert student["checkpoint_bytes"] == (out / "student/best.pt").stat().st_size
    # the table's student score is the one the training engine chose the checkpoint by
    assert student["dose_score"] == pytest.approx(metrics["student_training"]["best_val_dose_score"], rel=1e-4)
    assert metrics["student_beats_baseline"]["dose_score"] == (student["dose_score"] < baseline["dose_score"])
    idle = teacher["dose_score"] > (1 - MIN_TEACHER_LEAD) * baseline["dose_score"]
    assert any("little to teach" in w for w in metrics["warnings"]) == idle
    assert ("warning: " in printed and "little to teach" in printed) == idle
    table = (out / "comparison.md").read_text()
    assert table.count("\n| ") == 5 and "student (distilled)" in table and "student (distilled)" in printed
    log = [json.loads(line) for line in (out / "student" / "log.jsonl").read_text().splitlines()]
    assert {"loss_gt", "loss_teacher", "loss_hint", "loss_adversarial", "loss_discriminator"} <= set(log[-1])
    state = load_checkpoint(out / "student" / "checkpoints" / "last.pt")["objective"]
    assert set(state) >= {"adapters", "discriminator", "d_optimizer"}
    with open_data(out / "teacher.h5") as cache:
        assert len(cache.ids()) == 8 and cache.patient_attrs("pt_1")["teacher_key"] == metrics["teacher_key"]


def row(name: str, dose: float) -> Row:
    return Row(name, "unet3d", dose, 6.0, params=1, flops=1, cpu_latency_s=None, gpu_latency_s=None, checkpoint_bytes=1)


def test_a_teacher_barely_ahead_of_the_baseline_is_warned_about():
    """A student learns its teacher's doses: a teacher that barely beats the student's
    architecture trained alone has little to teach it, and the report says so."""
    student, baseline = row("student (distilled)", 4.61), row(BASELINE, 4.499)
    warning = idle_teacher([student, row(f"{TEACHER}, 3 members)", 4.468), baseline])
    assert warning is not None and "(4.468 Gy) is only 0.7 % better than" in warning and "(4.499 Gy)" in warning
    for tie_or_worse in (4.499, 4.6):
        warning = idle_teacher([student, row(f"{TEACHER}, 1 member)", tie_or_worse), baseline])
        assert warning is not None and "is no better than" in warning
    assert idle_teacher([student, row(f"{TEACHER}, 3 members)", 4.30), baseline]) is None  # 4.4 % ahead
    assert idle_teacher([student, row(f"{TEACHER}, 3 members)", 4.30), baseline], min_lead=0.05) is not None
    assert idle_teacher([student, row(f"{TEACHER}, 3 members)", 4.468)]) is None  # --no-baseline: nothing to compare
    assert idle_teacher([student, baseline]) is None  # a privileged teacher has no row


def test_student_checkpoint_predicts(run, data, nasdose, tmp_path):
    out, _ = run
    _, meta = load_model(out / "student")
    assert meta["model_config"] == {"name": "unet3d", "kwargs": {"widths": [4, 8]}, "genotype": None, "refiner": False}
    assert nasdose("predict", "-q", "--model", out / "student", "--data", data, "--out", tmp_path / "p",
                   "--split", "validation", "--no-csv", "runtime.device=cpu") == 0
    with open_data(tmp_path / "p" / "predictions.h5") as preds:
        assert preds.ids() == ["pt_7", "pt_8"]


def test_export_loads_and_matches_the_eager_student(run):
    out, _ = run
    program = torch.export.load(str(out / "student.pt2"))
    model, _ = load_model(out / "student")
    x = torch.randn(1, 10, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["student", "teacher ensemble"])
def test_onnx_export_matches_torch_off_the_training_grid(model, run, ensemble, nasdose, tmp_path):
    """The distilled student and the ensemble it learnt from, exported to ONNX by `nasdose export`,
    give torch's output in onnxruntime (to 1e-4) on a volume of another size than the 16³ they
    were trained and exported at, not a cube."""
    onnxruntime = pytest.importorskip("onnxruntime")
    source = run[0] / "student" if model == "student" else ensemble
    assert nasdose("-q", "export", "--model", source, "--out", tmp_path / "onnx") == 0
    info = load_yaml(tmp_path / "onnx" / "model.yaml")
    assert info["grids"]["example"] == 16 and info["kind"] == ("model" if model == "student" else "ensemble")
    x = torch.randn(1, 10, 24, 32, 40, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = load_model_or_ensemble(source)(x).numpy()
    got = session.run(None, {info["input"]["name"]: x.numpy()})[0]
    assert got.shape == expected.shape == (1, 1, 24, 32, 40)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 1e-3  # not a vacuous match of near-zero outputs


def test_resume_is_exact_and_reuses_the_teacher(data, ensemble, nasdose, tmp_path, cut_training):
    args = [ensemble, "--student", STUDENT, "--data", data, "--no-baseline", "-q", *TINY, "adversarial.weight=0.1"]
    assert nasdose("distill", *args, "--out", tmp_path / "whole") == 0
    cut_training(distill_stage, 3)
    assert nasdose("distill", *args, "--out", tmp_path / "cut") == 130
    assert load_checkpoint(tmp_path / "cut" / "student" / "checkpoints" / "last.pt")["step"] == 2
    made = (tmp_path / "cut" / "teacher.h5").stat().st_mtime_ns
    cut_training(distill_stage, None)
    assert nasdose("distill", *args, "--out", tmp_path / "cut", "--resume") == 0
    assert (tmp_path / "cut" / "teacher.h5").stat().st_mtime_ns == made
    whole, cut = (load_checkpoint(tmp_path / run / "student" / "checkpoints" / "last.pt") for run in ("whole", "cut"))
    assert cut["step"] == 4
    for key in ("model", "optimizer"):
        tensors = [k for k in whole[key] if isinstance(whole[key][k], torch.Tensor)]
        assert all(torch.equal(whole[key][k], cut[key][k]) for k in tensors)
    for k, v in whole["objective"]["discriminator"].items():
        assert torch.equal(v, cut["objective"]["discriminator"][k]), k
    # the teacher's predictions were computed by the interrupted start, as by the uninterrupted run
    assert load_json(tmp_path / "cut" / "metrics.json")["teacher_recomputed"] is True


def test_student_and_baseline_side_by_side_equal_one_after_another(run, data, ensemble, nasdose, tmp_path, capsys):
    """parallel=2 trains the student (hints, discriminator) and the baseline in two processes,
    with the same result as the single process of the `run` fixture."""
    first, _ = run
    assert nasdose("distill", ensemble, "--student", STUDENT, "--data", data, "--out", tmp_path / "side",
                   "--teacher-cache", first / "teacher.h5", *TINY, "hint.weight=0.5", "adversarial.weight=0.1",
                   "parallel=2") == 0
    assert "side by side" in capsys.readouterr().out
    for folder in ("student", "baseline"):
        a, b = (load_checkpoint(root / folder / "checkpoints" / "last.pt") for root in (first, tmp_path / "side"))
        assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6) for k in a["model"]), folder
    assert load_json(tmp_path / "side" / "metrics.json")["teacher_recomputed"] is False


def test_unlabeled_patients_are_taught_by_the_teacher_in_the_baselines_steps(unlabeled_data, ensemble, nasdose,
                                                                            tmp_path):
    """6 training and 4 unlabeled patients: the student's 4 epochs become round(4 · 6/10) = 2 of
    5 batches (10 steps), the baseline's 4 epochs of 3 batches are 12."""
    args = [ensemble, "--student", STUDENT, "--data", unlabeled_data, "-q", *TINY, "train.steps_per_epoch=null",
            "train.epochs=4"]
    assert nasdose("distill", *args, "--out", tmp_path / "run") == 0
    metrics = load_json(tmp_path / "run" / "metrics.json")
    assert metrics["training_patients"] == {"labeled": 6, "unlabeled": 4}
    assert metrics["epochs"] == {"student": 2, "baseline": 4}
    steps = {name: load_checkpoint(tmp_path / "run" / name / "checkpoints" / "last.pt")["step"]
             for name in ("student", "baseline")}
    assert steps == {"student": 10, "baseline": 12}
    with open_data(tmp_path / "run" / "teacher.h5") as cache:
        assert len(cache.ids()) == 12 and {"pt_9", "pt_12"} <= set(cache.ids())
    assert "4 unlabeled patients, from the teacher alone (2 epochs; the baseline 4)" in \
        (tmp_path / "run" / "comparison.md").read_text()
    # with no teacher term they would teach nothing: refused, nothing written
    assert nasdose("distill", *args, "--out", tmp_path / "zero", "alpha_teacher=0") == 1
    assert not (tmp_path / "zero" / "student").exists()
    # the unlabeled split switched off: the training split alone, for the full epochs
    assert nasdose("distill", *args, "--no-baseline", "--out", tmp_path / "off", "unlabeled.split=null") == 0
    metrics = load_json(tmp_path / "off" / "metrics.json")
    assert metrics["training_patients"] == {"labeled": 6, "unlabeled": 0} and metrics["epochs"]["student"] == 4


@pytest.mark.parametrize("same_steps, steps_per_epoch, expected", [(True, None, 15), (False, None, 60), (True, 5, 60)])
def test_student_epochs(same_steps, steps_per_epoch, expected):
    cfg = load_config(distill_stage.DistillConfig, overrides=[
        "train.epochs=60", f"unlabeled.same_steps={str(same_steps).lower()}",
        f"train.steps_per_epoch={'null' if steps_per_epoch is None else steps_per_epoch}"])
    assert distill_stage.student_epochs(cfg, 16, 48) == expected
    assert distill_stage.student_epochs(cfg, 16, 0) == 60


def test_resume_with_another_loss_is_refused(run, data, ensemble, nasdose, capsys):
    out, _ = run
    rc = nasdose("distill", ensemble, "--student", STUDENT, "--data", data, "--out", out, "--resume", *TINY,
                 "hint.weight=0.5", "adversarial.weight=0.2")
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and f"{out / 'config.yaml'}: " in err and "adversarial" in err


def test_teacher_on_unlabeled_without_unlabeled_patients_is_refused(data, ensemble, nasdose, tmp_path, capsys):
    # the data set has no unlabeled patients: the teacher would teach nothing
    rc = nasdose("distill", ensemble, "--student", STUDENT, "--data", data, "--out", tmp_path / "run", *TINY,
                 "teacher_on=unlabeled")
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "'teacher_on'" in err and "unlabeled patients" in err
    assert not (tmp_path / "run" / "student").exists()


def corrupt(path: Path) -> Path:
    save_yaml(path, {"format": "nasdose-ensemble", "version": 1, "members": []})
    return path


@pytest.mark.parametrize("case", ["missing ensemble", "corrupt ensemble", "predictions as data", "missing genotype",
                                  "run exists", "no student"])
def test_bad_input_is_one_line_naming_the_file(case, run, data, ensemble, nasdose, tmp_path, capsys):
    out, _ = run
    teacher, data_arg, student, dest, named = ensemble, data, STUDENT, tmp_path / "new", None
    if case == "missing ensemble":
        teacher = named = tmp_path / "absent.yaml"
    elif case == "corrupt ensemble":
        teacher = named = corrupt(tmp_path / "bad.yaml")
    elif case == "predictions as data":
        data_arg = named = out / "teacher.h5"
    elif case == "missing genotype":
        student, named = f"{tmp_path / 'g.yaml'}:width=0.5", tmp_path / "g.yaml"
    elif case == "run exists":
        dest = named = out
    args = ["distill", teacher, "--data", data_arg, "--out", dest, *TINY]
    rc = nasdose(*args, "--student", student) if case != "no student" else nasdose(*args)
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("nasdose distill: error: ")
    assert (f"{named}: " in err) if named is not None else "--student" in err
    assert not (tmp_path / "new" / "student").exists()


def test_help_documents_the_student_spec(nasdose, capsys):
    with pytest.raises(SystemExit):
        nasdose("distill", "--help")
    out = capsys.readouterr().out
    assert "unet3d:widths=8,16,32" in out and "genotype.yaml:width=0.5" in out and "--no-baseline" in out


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one(data, ensemble, nasdose, tmp_path):
    """The student trains data-parallel (hint adapters and critic included); files come from rank 0."""
    args = [ensemble, "--student", STUDENT, "--data", data, "--no-baseline", "-q", *TINY, "train.data.batch_size=2",
            "hint.weight=0.5", "adversarial.weight=0.1"]
    assert nasdose("distill", *args, "--out", tmp_path / "one") == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nas_dose", "distill", *map(str, args), "--out", str(tmp_path / "two")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (load_checkpoint(tmp_path / run / "student" / "checkpoints" / "last.pt") for run in ("one", "two"))
    for a, b in ((one["model"], two["model"]), (one["objective"]["discriminator"], two["objective"]["discriminator"]),
                 (one["objective"]["adapters"], two["objective"]["adapters"])):
        for k in a:  # float32 convolutions round differently on batches of 1 and 2, which Adam magnifies
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=3e-4)
    logs = [[json.loads(line) for line in (tmp_path / run / "student" / "log.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 4
    for e, r in zip(*logs):
        assert {k: v for k, v in e.items() if k.startswith("loss")} == pytest.approx(
            {k: v for k, v in r.items() if k.startswith("loss")}, rel=1e-4)
    metrics = load_json(tmp_path / "two" / "metrics.json")
    assert metrics["teacher_recomputed"] is True and len(metrics["rows"]) == 3
    # the teacher cache the two ranks predicted half each, merged, is the one-process cache
    assert not list((tmp_path / "two").glob("teacher.h5.part*"))
    with open_data(tmp_path / "one" / "teacher.h5") as a, open_data(tmp_path / "two" / "teacher.h5") as b:
        assert a.ids() == b.ids() and a.attrs == b.attrs
        for pid in a.ids():
            assert a.patient_attrs(pid) == b.patient_attrs(pid)
            assert (a.read_dose(pid) == b.read_dose(pid)).all(), pid
