"""The command line end to end: data synth -> train -> predict -> evaluate, the pipeline, bad input."""
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from nas_dose import pipeline
from nas_dose.cli import main
from nas_dose.config import load_config
from nas_dose.data.store import open_data
from nas_dose.io import load_yaml
from nas_dose.models.factory import build_model, check_input_size
from nas_dose.pipeline import Context, members_base, side_by_side, stages_for, train_base
from nas_dose.recipe import load_recipe
from nas_dose.scores import dose_error
from nas_dose.training import TrainConfig

# Learns in seconds on the 16³ grid: a small U-Net, one patient per step, one thread.
TRAIN = ["model.kwargs.widths=[8, 16, 32]", "epochs=8", "data.batch_size=1", "optim.lr=0.01",
         "data.augment.enabled=false", "runtime.device=cpu", "runtime.threads=1"]


def nasdose(capsys, *argv) -> tuple[int, str]:
    """Run the CLI; returns the exit status and stderr."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    """data synth -> train -> predict -> evaluate, once for the module (exit statuses checked)."""
    root = tmp_path_factory.mktemp("e2e")
    steps = [
        ["data", "synth", root / "data.h5", "--patients", 8, "--grid", 16, "--seed", 0],
        ["train", "--data", root / "data.h5", "--out", root / "run", *TRAIN],
        ["predict", "--model", root / "run", "--data", root / "data.h5", "--out", root / "pred",
         "--split", "validation", "runtime.device=cpu", "runtime.threads=1"],
        ["evaluate", "--pred", root / "pred" / "predictions.h5", "--ref", root / "data.h5",
         "--out", root / "eval", "--split", "validation", "--plots", 1],
    ]
    for argv in steps:
        assert main([str(a) for a in [argv[0], "--quiet", *argv[1:]]]) == 0, argv[0]
    return root


def test_workflow_files_and_finite_metrics(workflow):
    run = workflow / "run"
    for path in ["data.h5", "run/config.yaml", "run/log.jsonl", "run/best.pt", "run/checkpoints/last.pt",
                 "run/metrics.json", "run/curve.png", "pred/predictions.h5", "pred/config.yaml", "eval/metrics.json"]:
        assert (workflow / path).is_file(), path
    assert sorted(p.name for p in (workflow / "pred" / "submission").iterdir()) == ["pt_7.csv", "pt_8.csv"]
    assert list((workflow / "eval" / "plots").glob("*.png"))
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("best_val_dose_score", "zero_dose_val_score", "seconds", "seconds_per_epoch"):
        assert math.isfinite(metrics[key]), key
    assert metrics["steps"] == 48 and metrics["epochs"] == 8 and metrics["parameters"] > 0
    scores = json.loads((workflow / "eval" / "metrics.json").read_text())
    assert math.isfinite(scores["dose_score"]) and math.isfinite(scores["dvh_score"])
    assert scores["n_patients"] == 2


def test_training_prints_one_line_per_epoch(workflow, tmp_path, capsys):
    """What a user watching a run sees: each epoch's loss, learning rate and validation score."""
    capsys.readouterr()
    assert main(["train", "--data", str(workflow / "data.h5"), "--out", str(tmp_path / "run"), *TRAIN]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ": loss " in line]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    ends = [e for e in log if e["val_dose_score"] is not None]
    assert len(lines) == len(ends) == 8
    last = f"validation dose score {ends[-1]['val_dose_score']:.3f} Gy"
    assert lines[-1].startswith("epoch 8/8: loss ") and last in lines[-1]


def test_trained_model_beats_the_all_zero_prediction(workflow):
    scores = json.loads((workflow / "eval" / "metrics.json").read_text())
    with open_data(workflow / "data.h5") as data:
        zero = np.mean([dose_error(np.zeros_like(p.dose), p.dose, p.possible_dose_mask)
                        for p in map(data.read, data.ids("validation"))])
    assert scores["dose_score"] < zero
    # Training's validation score is the official dose score of what `predict` writes.
    metrics = json.loads((workflow / "run" / "metrics.json").read_text())
    assert scores["dose_score"] == pytest.approx(metrics["best_val_dose_score"], rel=1e-4)
    assert metrics["zero_dose_val_score"] == pytest.approx(zero, rel=1e-5)


def test_resume_of_a_finished_run_changes_nothing(workflow, capsys):
    before = (workflow / "run" / "best.pt").read_bytes()
    code, err = nasdose(capsys, "train", "--quiet", "--data", workflow / "data.h5", "--out", workflow / "run",
                        "--resume", *TRAIN)
    assert code == 0 and err == ""
    assert (workflow / "run" / "best.pt").read_bytes() == before


@pytest.fixture
def bad(workflow, tmp_path) -> dict[str, Path]:
    cut = tmp_path / "cut.pt"
    cut.write_bytes((workflow / "run" / "best.pt").read_bytes()[:2000])
    config = tmp_path / "typo.yaml"
    config.write_text("optim:\n  lr: 0.001\n  moment: 0.9\n")
    return {"data": workflow / "data.h5", "cut": cut, "config": config, "out": tmp_path / "out"}


@pytest.mark.parametrize("case", ["missing data", "bad key", "bad key in file", "truncated checkpoint",
                                  "existing run"])
def test_bad_input_is_one_line_exit_1_and_no_output(capsys, workflow, bad, case):
    argv, named = {
        "missing data": (["train", "--data", bad["out"].parent / "nope.h5", "--out", bad["out"]], "nope.h5"),
        "bad key": (["train", "--data", bad["data"], "--out", bad["out"], "optim.lrr=1"], "'optim.lrr'"),
        "bad key in file": (["train", "--data", bad["data"], "--out", bad["out"], "--config", bad["config"]],
                            "typo.yaml: unknown config key 'optim.moment'"),
        "truncated checkpoint": (["predict", "--model", bad["cut"], "--data", bad["data"], "--out", bad["out"]],
                                 "cut.pt"),
        "existing run": (["train", "--data", bad["data"], "--out", workflow / "run", *TRAIN], "--resume"),
    }[case]
    code, err = nasdose(capsys, argv[0], "--quiet", *argv[1:])
    assert code == 1
    assert err.count("\n") == 1 and named in err and "Traceback" not in err
    assert not bad["out"].exists()


def test_quick_pipeline_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "pipe"
    capsys.readouterr()
    assert main(["pipeline", "--out", str(out), "--quick", "--unlabeled", "2"]) == 0
    first = capsys.readouterr().out
    assert "unet3d" in first and "all-zero dose" in first and str(out / "data.h5") in first
    for path in ["data.h5", "train/unet3d/best.pt", "predict/unet3d/predictions.h5", "evaluate/unet3d/metrics.json",
                 "search/pool.yaml", "ensemble/ensemble.yaml", "distill/comparison.md", "distill/student/best.pt",
                 "evaluate/ensemble/metrics.json", "evaluate/student/metrics.json"]:
        assert (out / path).exists(), path
    assert "best single member" in first and "student arch., no distillation" in first
    # the two unlabeled phantoms reach the student alone
    assert json.loads((out / "distill" / "metrics.json").read_text())["training_patients"]["unlabeled"] == 2
    assert main(["pipeline", "--out", str(out), "--quick", "--unlabeled", "2"]) == 0
    again = capsys.readouterr().out
    assert again.count("done already, skipped") == len(stages_for(load_recipe()))
    assert again.split("scores on the validation")[1] == first.split("scores on the validation")[1]
    code = main(["pipeline", "--out", str(out), "--quick", "--unlabeled", "2", "--seed", "1"])
    assert code == 1 and "config.yaml" in capsys.readouterr().err


def test_pipeline_epochs_set_every_training_budget(tmp_path, monkeypatch):
    """--epochs E: the members, the student and its baseline E epochs, the reference U-Net E/2."""
    ctx = Context(tmp_path, load_recipe(), grid=32, epochs=200)
    assert train_base(ctx)["epochs"] == 100
    seen = {}
    monkeypatch.setattr(pipeline.ensemble, "run", lambda cfg, inputs, out, resume: seen.update(ensemble=cfg))
    monkeypatch.setattr(pipeline.distill, "run", lambda cfg, inputs, out, resume: seen.update(distill=cfg))
    for stage in stages_for(ctx.recipe):
        if stage.name in ("ensemble", "distill"):
            stage.run(ctx)
    assert seen["ensemble"].train.epochs == seen["distill"].train.epochs == 200
    # two trainings at once on a CPU with two cores or more; one at a time on a GPU
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(pipeline.torch.cuda, "is_available", lambda: False)
    assert side_by_side(quick=False) == 2 and side_by_side(quick=True) == 1
    monkeypatch.setattr(pipeline.torch.cuda, "is_available", lambda: True)
    assert side_by_side(quick=False) == 1
    assert members_base(ctx)["parallel"] == side_by_side(quick=False)


@pytest.mark.parametrize("args, expected", [
    ([], {"grid": 16, "patients": 24, "unlabeled": 48, "epochs": 450}),
    (["--grid", "32", "--unlabeled", "0", "--epochs", "60"], {"grid": 32, "unlabeled": 0, "epochs": 60}),
    (["--quick"], {"grid": 16, "patients": 8, "unlabeled": 0}),
    (["--data", "TREE"], {"grid": 32, "epochs": 30, "patients": 0, "unlabeled": 0}),
])
def test_pipeline_defaults(tmp_path, monkeypatch, args, expected):
    """The synthetic default: 24 phantoms at 16³ with 48 unlabeled ones, 450 epochs; an OpenKBP
    tree: 32³, 30 epochs."""
    seen = {}

    def record(ctx):
        data = ctx.recipe.synthetic
        seen.update(grid=ctx.grid, epochs=ctx.epochs, source=ctx.source, patients=data.patients if ctx.source is None
                    else 0, unlabeled=data.unlabeled if ctx.source is None else 0)

    monkeypatch.setattr(pipeline, "run_stages", record)
    monkeypatch.setattr(pipeline, "report", lambda ctx: "")
    (tmp_path / "TREE").mkdir()
    args = [str(tmp_path / a) if a == "TREE" else a for a in args]
    assert main(["pipeline", "--out", str(tmp_path / "pipe"), *args]) == 0
    assert {k: seen[k] for k in expected} == expected
    assert (seen["source"] is None) == ("--data" not in args)


@pytest.mark.parametrize("grid, levels", [(16, 4), (32, 5), (128, 5)])
def test_reference_unet_fits_every_grid(tmp_path, grid, levels):
    """The standard 5-level unet3d, a level fewer at 16³ where its bottleneck would be 1 voxel."""
    cfg = load_config(TrainConfig, base=train_base(Context(tmp_path, load_recipe(), grid=grid, epochs=450)))
    assert cfg.model.kwargs["widths"] == [16, 32, 64, 128, 256][:levels]
    check_input_size(build_model(cfg.model), grid)


def _openkbp_tree(root: Path, grid: int = 16) -> Path:
    """Eight synthetic phantoms as an OpenKBP npz tree: six in train/, two in validation/."""
    from nas_dose.data.synth import synth_patients

    for p in synth_patients(8, grid, seed=3):
        folder = root / ("validation" if p.attrs["split"] == "validation" else "train")
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / f"{p.id}.npz", ct=p.ct, dose=p.dose, possible_dose_mask=p.possible_dose_mask,
                            voxel_dimensions_mm=np.array(p.voxel_mm, np.float32), **p.structures)
    return root


def test_pipeline_on_an_openkbp_tree(tmp_path, capsys):
    """--data: the tree is imported into DIR/data.h5 and every stage runs on its patients."""
    tree = _openkbp_tree(tmp_path / "kbp")
    out = tmp_path / "pipe"
    capsys.readouterr()
    assert main(["pipeline", "--out", str(out), "--data", str(tree), "--grid", "16", "--quick", "-q"]) == 0
    report = capsys.readouterr().out
    with open_data(out / "data.h5") as data:
        assert data.attrs["source"] == f"openkbp:{tree.resolve()}" and data.grid == 16
        validation = data.ids("validation")
    assert len(validation) == len(list((tree / "validation").glob("*.npz"))) > 0
    for name in ("unet3d", "ensemble", "student"):
        with open_data(out / "predict" / name / "predictions.h5") as pred:
            assert pred.ids() == validation
    assert "student arch., no distillation" in report
    assert load_yaml(out / "config.yaml")["data"] == str(tree.resolve())


def test_pipeline_reads_a_data_set_where_it_lies(tmp_path, monkeypatch):
    """--data D.h5: no copy in DIR, the data stage skipped, the grid the file's own."""
    assert main(["data", "synth", str(tmp_path / "d.h5"), "--patients", "8", "--grid", "16", "-q"]) == 0
    seen = []
    monkeypatch.setattr(pipeline, "run_stages", lambda ctx: seen.append(ctx))
    monkeypatch.setattr(pipeline, "report", lambda ctx: "")
    assert main(["pipeline", "--out", str(tmp_path / "pipe"), "--data", str(tmp_path / "d.h5")]) == 0
    ctx = seen[0]
    assert ctx.data == tmp_path / "d.h5" and ctx.grid == 16 and not ctx.recipe.quick
    assert all(p.exists() for p in stages_for(ctx.recipe)[0].outputs(ctx))  # so the data stage is skipped


@pytest.mark.parametrize("case", ["patients", "grid", "no validation", "unlabeled validation", "missing",
                                  "predictions"])
def test_pipeline_refuses_unusable_data(tmp_path, capsys, case):
    data = tmp_path / "d.h5"
    assert main(["data", "synth", str(data), "--patients", "8", "--grid", "16", "-q"]) == 0
    extra: list[str] = []
    if case == "patients":
        extra = ["--patients", "4"]
    elif case == "grid":
        extra = ["--grid", "32"]
    elif case in ("no validation", "unlabeled validation"):
        with h5py.File(data, "a") as f:
            for group in [g for g in f["patients"].values() if g.attrs["split"] == "validation"]:
                if case == "no validation":
                    group.attrs["split"] = "train"
                else:
                    del group["dose"]
                    break
    elif case == "missing":
        data = tmp_path / "nowhere"
    else:
        with h5py.File(data, "a") as f:
            f.attrs["nasdose_format"] = "predictions"
    code, err = nasdose(capsys, "pipeline", "--out", tmp_path / "pipe", "--data", data, *extra)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    named = {"patients": "--patients", "grid": "--grid 32", "no validation": "validation patients",
             "unlabeled validation": "1 with a dose", "missing": "not found", "predictions": "prediction file"}[case]
    assert named in err, err
    assert not (tmp_path / "pipe").exists()
