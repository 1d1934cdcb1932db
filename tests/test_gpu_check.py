"""benchmarks/gpu_prepare.sh and gpu_check.sh in their dry mode: issue 21's device run (a GPU, a
64 MiB copy of the working tree, no network, 8 files back) rehearsed on the CPU at a tiny size,
so that the one script a session with the device runs does not rot while nobody has one."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402  (benchmarks/ is no package)

sys.path.remove(str(ROOT / "benchmarks"))
BACK = {"gpu_check.log", "summary.json", "suite_loader.json", "suite_runtime.json", "probe_log.jsonl",
        "train_log.jsonl", "train_metrics.json", "eval_metrics.json"}


@pytest.mark.openkbp
@pytest.mark.slow
def test_gpu_check_dry_run(openkbp_dir: Path, tmp_path: Path) -> None:
    src = openkbp_dir / "npz128"
    if not src.is_dir() or shutil.which("bash") is None or shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs bash, git, a git checkout and the OpenKBP npz128 patients")
    carry, out = tmp_path / "carry", tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           "GPU_PREPARE_SRC": str(src), "GPU_PREPARE_DEST": str(carry), "GPU_PREPARE_GRID": "16",
           "GPU_PREPARE_TRAIN": "2", "GPU_PREPARE_VAL": "1", "GPU_PREPARE_WHEELS": "0"}
    prepared = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_prepare.sh")], env=env, capture_output=True,
                              text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stdout[-2000:] + prepared.stderr[-2000:]
    info = json.loads((carry / "openkbp.json").read_text())
    assert (info["train"], info["validation"], info["grid"]) == (2, 1, 16)
    assert info["source_train"] > 2 and "carry=[" in prepared.stdout

    env.update(OUT=str(out), GPU_CHECK_DRY="1", GPU_CHECK_CARRY=str(carry), GPU_CHECK_PARTS="suite train pipeline")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    # The device sends back at most 8 files, at most 2 folders down: these 8, at the top.
    assert {p.name for p in out.iterdir()} == BACK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_asked"] == 1
    assert summary["training"]["finished"] and summary["training"]["epochs_done"] == 1
    scores = summary["validation_scores"]
    assert scores == {k: json.loads((out / "eval_metrics.json").read_text())[k] for k in ("dose_score", "dvh_score")}
    assert all(math.isfinite(v) and v > 0 for v in scores.values())
    assert {row["status"] for row in summary["suite"]["runtime"]} <= {"info", "met", "NOT MET", "skipped"}
    assert any(row["status"] != "skipped" for row in summary["suite"]["loader"])
    # the pipeline smoke run took the carried data through search, ensemble and distillation
    assert summary["pipeline"] == {"search": True, "ensemble": True, "distill": True}
    assert "pipeline smoke run, stages finished" in (out / "gpu_check.log").read_text()
    assert not list(tmp_path.glob("gpu_check.*"))  # the work folder is removed



def entry(step: int, seconds: float, val: float | None = None) -> dict:
    return {"step": step, "epoch": 1, "loss": 0.1, "lr": 1e-4, "val_dose_score": val, "seconds": seconds}


# A probe's log: 2 epochs of 12 steps logged every 5 steps and at each epoch's end; 0.1 s a step,
# 8 s of warm-up first, 1.5 s of validation before an epoch's last entry and 0.5 s of checkpoint after it.
PROBE = [entry(5, 8.5), entry(10, 9.0), entry(12, 10.7, 20.0), entry(15, 11.5), entry(20, 12.0), entry(24, 13.9, 15.0)]


def test_the_epoch_count_fills_the_time_left_after_the_probe_with_its_second_epochs_length() -> None:
    # the second epoch: 13.9 - 10.7 = 3.2 s; probe wall 20 s: 2 + floor(0.9 * (80 - 20) / 3.2) = 18
    assert gpu_check.epochs_that_fit(PROBE, wall=20, avail=80, most=100) == 18
    assert gpu_check.epochs_that_fit(PROBE, wall=20, avail=80, most=12) == 12
    assert gpu_check.epochs_that_fit(PROBE, wall=20, avail=10, most=100) == 1
    with pytest.raises(SystemExit, match="fewer than 2 epoch ends"):
        gpu_check.epochs_that_fit(PROBE[:3], wall=20, avail=80, most=100)


def test_the_step_rate_leaves_out_warm_up_validation_and_checkpoints() -> None:
    # 5 -> 10 and 15 -> 20 only: 10 steps/s (the log's 24 steps in 13.9 s would say 1.7)
    assert gpu_check.step_rate(PROBE) == pytest.approx(10.0)
    assert gpu_check.step_rate(PROBE[2:4]) is None


def test_the_pipeline_smoke_recipe_keeps_the_recipes_sizes_with_the_fewest_steps(tmp_path: Path) -> None:
    recipe = ROOT / "configs" / "openkbp_gpu.yaml"
    gpu_check.main(["pipeline", str(recipe), str(tmp_path / "smoke.yaml")])
    smoke, full = (gpu_check.load_yaml(p) for p in (tmp_path / "smoke.yaml", recipe))
    assert smoke["stages"] == ["search", "ensemble", "distill"] and smoke["epochs"] == 1
    assert smoke["search"]["options"]["evaluator"]["supernet_steps"] == 10 and smoke["search"]["pool_size"] == 2
    assert (smoke["grid"], smoke["distill"]["runtime"], smoke["train"]) == (full["grid"], full["distill"]["runtime"],
                                                                         full["train"])
    gpu_check.main(["pipeline", str(recipe), str(tmp_path / "dry.yaml"), "--dry"])
    dry = gpu_check.load_yaml(tmp_path / "dry.yaml")
    assert dry["grid"] == 16 and dry["ensemble"]["runtime"] == {"device": "cpu", "threads": 1}


def test_training_figures_bound_an_epoch_of_the_whole_training_split_without_validation_times(
        tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("data: {batch_size: 2}\n")
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in PROBE))
    figures = gpu_check.training_figures(tmp_path, {"grid": 128, "source_train": 169})
    assert not figures["finished"]  # no metrics.json: cut short
    assert (figures["epochs_done"], figures["steps"], figures["steps_per_epoch"]) == (2, 24, 12)
    assert figures["voxels_per_s"] == pytest.approx(10 * 2 * 128 ** 3)
    # 3.2 s an epoch, 1.2 of them 12 steps: 2 s of validation and checkpoint; 169 patients: 85 steps
    assert figures["epoch_rest_s"] == pytest.approx(2.0)
    assert (figures["full_split_steps"], figures["full_split_epoch_s_lower"]) == (85, pytest.approx(10.5))
    assert "full_split_epoch_s_estimate" not in figures


def test_training_figures_estimate_a_full_epoch_at_the_pace_the_loader_allowed(tmp_path: Path) -> None:
    # The probe's epochs with 2 s of validation logged: 3.2 - 2 = 1.2 s for 12 steps, the GPU's
    # own pace; then the same epochs 2 s longer, as a loader that keeps the steps waiting makes them.
    (tmp_path / "config.yaml").write_text("data: {batch_size: 2}\n")
    timed = [dict(e, val_seconds=2.0, data_wait_s=0.32) if e["val_dose_score"] is not None else e for e in PROBE]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in timed))
    figures = gpu_check.training_figures(tmp_path, {"grid": 128, "source_train": 169})
    assert figures["epoch_steps_per_s"] == pytest.approx(10.0) and not figures["loader_bound"]
    assert figures["data_wait_share"] == pytest.approx(0.1)
    assert figures["full_split_epoch_s_estimate"] == pytest.approx(85 / 10 + 2)
    slow = [dict(e, seconds=e["seconds"] + (2.0 if i >= 5 else 0.0)) for i, e in enumerate(timed)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in slow))
    figures = gpu_check.training_figures(tmp_path, {"grid": 128, "source_train": 169})
    assert figures["epoch_steps_per_s"] == pytest.approx(12 / 3.2) and figures["loader_bound"]
    assert figures["full_split_epoch_s_estimate"] == pytest.approx(85 / (12 / 3.2) + 2)
