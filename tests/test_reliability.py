"""Reliability through the command line (issue 16): output paths checked before any work, one
nasdose process per output, temporaries of killed runs removed, physically invalid inputs
refused, nothing half-made left by a refused run, and the smaller command-line errors.

Every refusal must be one line on stderr naming the file, exit status 1, and no new output."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from nas_dose.cli import main
from nas_dose.data.store import write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.io import save_yaml
from nas_dose.search_spaces import get_space, save_genotype

# Seconds on the 16³ grid: a two-level U-Net, one epoch of one-patient steps, one thread.
BUDGET = ["epochs=1", "data.batch_size=1", "data.augment.enabled=false", "runtime.device=cpu", "runtime.threads=1"]
TRAIN = ["model.kwargs.widths=[4, 8]", *BUDGET]
SEARCH = ["space=lenas", "strategy=random", "pool_size=1", "macro={stem: 2, widths: [4, 4]}",
          "options={budget: 1, evaluator: {supernet_steps: 1, batch_size: 1}}", "runtime.threads=1"]
RUNTIME = ["runtime.device=cpu", "runtime.threads=1"]


@pytest.fixture
def nasdose(capsys):
    """Run the CLI in-process; returns (exit status, stderr)."""

    def run(*argv) -> tuple[int, str]:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        return code, capsys.readouterr().err

    return run


def refused(result: tuple[int, str], *named: str) -> None:
    """Exit status 1 and one line on stderr, without a traceback, holding every text of `named`."""
    code, err = result
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)


@pytest.fixture(scope="module")
def run16(tmp_path_factory, data) -> Path:
    """A tiny model trained on `data` (16³)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "-q", "--data", str(data), "--out", str(out), *TRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, data) -> Path:
    """ensemble.yaml of one tiny LENAS member (2 steps of training)."""
    root = tmp_path_factory.mktemp("ensemble")
    member = root / "members" / "a"
    choices = {"down.op1": "conv", "down.op2": "identity", "down.connect": "identity", "down.down": "max_pool",
               "up.op1": "conv", "up.op2": "identity", "up.connect": "identity", "up.up": "up_interpolate"}
    save_genotype(member / "genotype.yaml", get_space("lenas").genotype(choices, {"stem": 2, "widths": [4, 4]}))
    assert main(["train", "-q", "--data", str(data), "--out", str(member), "model.name=lenas",
                 f"model.genotype={member / 'genotype.yaml'}", "steps_per_epoch=2", *BUDGET]) == 0
    save_yaml(root / "ensemble.yaml", {"format": "nasdose-ensemble", "version": 1, "tta": False, "members": [
        {"name": "a", "genotype": "members/a/genotype.yaml", "checkpoint": "members/a/best.pt", "weight": 1.0}]})
    return root / "ensemble.yaml"


def edited(data: Path, tmp_path: Path, edit) -> Path:
    """A copy of `data` with `edit(h5py.File)` applied to it."""
    copy = tmp_path / "edited.h5"
    shutil.copy(data, copy)
    with h5py.File(copy, "a") as f:
        edit(f)
    return copy


def set_array(pid: str, name: str, change):
    """An edit that rewrites one array of patient `pid` (None: delete it) with `change(array)`."""

    def edit(f: h5py.File) -> None:
        group = f["patients"][pid]
        array = group[name][()]
        del group[name]
        if change is not None:
            group.create_dataset(name, data=change(array))

    return edit


def with_nan(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array[0, 0, 0] = np.nan
    return array


# ---------------------------------------------------------------------------------------------
# 1. Output paths are checked before any work.

def command_writing_to(out: Path, data: Path, run16: Path, ensemble: Path) -> list:
    """Every command that writes an output folder, each given `out` as that folder."""
    return [
        ["train", "--data", data, "--out", out, *TRAIN],
        ["predict", "--model", run16, "--data", data, "--out", out],
        ["evaluate", "--pred", data, "--ref", data, "--out", out],
        ["search", "--data", data, "--out", out, *SEARCH],
        ["ensemble", ensemble, "--data", data, "--out", out],
        ["distill", ensemble, "--student", "unet3d:widths=4,8", "--data", data, "--out", out],
        ["pipeline", "--out", out, "--quick"],
    ]


def test_an_existing_file_as_out_is_refused_by_every_command(tmp_path, nasdose, data, run16, ensemble):
    out = tmp_path / "a_file"
    out.write_text("mine")
    for argv in command_writing_to(out, data, run16, ensemble):
        refused(nasdose(*argv[:1], "-q", *argv[1:]), f"{out}: is a file, not a folder")
        assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_import_output_under_a_file_or_on_a_folder_is_refused_before_reading(tmp_path, nasdose):
    (tmp_path / "a_file").write_text("mine")
    # the source does not even exist: the output is checked first, before any work
    refused(nasdose("data", "import", tmp_path / "nowhere", tmp_path / "a_file" / "d.h5"),
            f"{tmp_path / 'a_file'}: is a file")
    refused(nasdose("data", "import", tmp_path / "nowhere", tmp_path), f"{tmp_path}: is a folder")
    refused(nasdose("data", "synth", tmp_path / "a_file" / "sub" / "d.h5", "--patients", 2, "--grid", 16),
            "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_read_only_folder_is_refused(tmp_path, nasdose, data, monkeypatch):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anyway: let the check see the folder as a user would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not str(p).startswith(str(locked)))
    try:
        refused(nasdose("train", "-q", "--data", data, "--out", locked, *TRAIN), f"{locked}: is not writable")
        refused(nasdose("data", "synth", locked / "d.h5", "--patients", 2, "--grid", 16), "is not writable")
        refused(nasdose("train", "-q", "--data", data, "--out", locked / "run", *TRAIN), "is not writable")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 2. Temporaries of a killed run are removed by the next run on the same output.

def test_resume_removes_the_checkpoint_temporaries_a_kill_left(tmp_path, nasdose, data):
    out = tmp_path / "run"
    assert nasdose("train", "-q", "--data", data, "--out", out, *TRAIN)[0] == 0
    stale = [out / "checkpoints" / ".last.pt.k1ll3d_x.tmp", out / ".best.pt.abcdefgh.tmp",
             out / "sub" / ".metrics.json.0123abcd.tmp"]
    kept = [out / "notes.tmp", out / ".hidden.tmp"]  # not atomic_path's: the user's
    held = [out / "held" / ".x.pt.abcdefgh.tmp", out / ".d.h5.abcdefgh.tmp"]  # another process's outputs
    for path in [*stale, *kept, *held]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    (out / "held" / ".nasdose.lock").write_text("")
    (out / ".d.h5.lock").write_text("")
    assert nasdose("train", "-q", "--data", data, "--out", out, "--resume", *TRAIN)[0] == 0
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in [*kept, *held])
    assert not (out / ".nasdose.lock").exists()  # released and removed on exit


def test_a_re_run_of_import_removes_the_temporaries_of_its_output_only(tmp_path, nasdose):
    mine, other = tmp_path / ".out.h5.abcd1234.tmp", tmp_path / ".other.h5.abcd1234.tmp"
    mine.write_bytes(b"half")
    other.write_bytes(b"another command's")
    assert nasdose("data", "synth", tmp_path / "out.h5", "--patients", 2, "--grid", 16, "-q")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "out.h5"]


# ---------------------------------------------------------------------------------------------
# 3. One nasdose process per output.

HOLD = textwrap.dedent("""
    import sys, time
    from nas_dose.io import output_file, output_folder
    with (output_folder if sys.argv[2] == "folder" else output_file)(sys.argv[1]):
        print("held", flush=True)
        time.sleep(3600)  # until the test kills it
""")


@pytest.fixture
def holder():
    """Start a process that holds a folder or file as nasdose commands do; yields its pid."""
    started = []

    def hold(path: Path, kind: str) -> int:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), kind], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc.pid

    yield hold
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_second_process_on_the_same_output_is_refused(tmp_path, nasdose, data, holder):
    out = tmp_path / "run"
    pid = holder(out, "folder")
    refused(nasdose("train", "-q", "--data", data, "--out", out, *TRAIN),
            f"{out}: is in use by another nasdose process (pid {pid})")
    refused(nasdose("predict", "-q", "--model", out, "--data", data, "--out", out), f"(pid {pid})")
    assert sorted(p.name for p in out.iterdir()) == [".nasdose.lock"]  # the holder's, untouched
    pid = holder(tmp_path / "d.h5", "file")
    refused(nasdose("data", "synth", tmp_path / "d.h5", "--patients", 2, "--grid", 16), f"(pid {pid})")
    assert not (tmp_path / "d.h5").exists()


def test_under_torchrun_every_rank_is_refused_and_none_writes(tmp_path, data, holder):
    """The main rank holds the folder for all ranks; its refusal stops every one of them."""
    out = tmp_path / "run"
    pid = holder(out, "folder")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nas_dose", "train", "-q", "--data", str(data), "--out", str(out),
                           *TRAIN, "data.batch_size=2"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count(f"is in use by another nasdose process (pid {pid})") == 2, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".nasdose.lock"]


def test_the_lock_file_of_a_killed_holder_does_not_block(tmp_path, nasdose, data, holder):
    out = tmp_path / "run"
    pid = holder(out, "folder")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert (out / ".nasdose.lock").exists()  # left by the kill; the kernel released the lock
    assert nasdose("train", "-q", "--data", data, "--out", out, *TRAIN)[0] == 0


def test_a_held_folder_does_not_block_its_subfolders(tmp_path, nasdose, data, holder):
    """Side-by-side trainings write into subfolders of the folder their command holds, without a
    lock of their own: a command there is not refused, and leaves their temporaries alone."""
    holder(tmp_path / "parent", "folder")
    live = tmp_path / "parent" / "member" / "checkpoints" / ".last.pt.abcdefgh.tmp"
    live.parent.mkdir(parents=True)
    live.write_bytes(b"being written")
    assert nasdose("train", "-q", "--data", data, "--out", tmp_path / "parent" / "member", *TRAIN)[0] == 0
    assert live.exists()


# ---------------------------------------------------------------------------------------------
# 4. Inputs that are not physically valid.

def npz_tree(root: Path, change=None) -> Path:
    """An OpenKBP npz folder of two 16³ phantoms; `change(arrays)` edits the second one's."""
    root.mkdir()
    for p in synth_patients(2, 16, seed=0):
        arrays = {"ct": p.ct, "possible_dose_mask": p.possible_dose_mask, "dose": p.dose,
                  "voxel_dimensions_mm": np.array(p.voxel_mm), **p.structures}
        if change is not None and p.id == "pt_2":
            change(arrays)
        np.savez(root / f"{p.id}.npz", **arrays)
    return root


def negative_dose(arrays: dict) -> None:
    arrays["dose"] = arrays["dose"] - 5.0


def no_target(arrays: dict) -> None:
    for name in ("PTV56", "PTV63", "PTV70"):
        arrays.pop(name, None)


@pytest.mark.parametrize("change, problem", [(negative_dose, "negative"), (no_target, "no target contoured")])
def test_import_refuses_a_negative_dose_or_a_patient_without_target(tmp_path, nasdose, change, problem):
    tree = npz_tree(tmp_path / "tree", change)
    refused(nasdose("data", "import", tree, tmp_path / "d.h5", "--grid", 16, "-q"),
            f"{tree / 'pt_2.npz'}: patient pt_2", problem)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def test_a_non_finite_array_in_a_data_set_is_named_with_file_and_patient(tmp_path, nasdose, data, run16):
    nan_ct = edited(data, tmp_path, set_array("pt_1", "ct", with_nan))
    refused(nasdose("train", "-q", "--data", nan_ct, "--out", tmp_path / "run", *TRAIN),
            f"{nan_ct}: patient pt_1: 'ct' holds NaN or infinite values")
    assert not (tmp_path / "run").exists()
    nan_ct.unlink()
    preds = tmp_path / "p"
    assert nasdose("predict", "-q", "--model", run16, "--data", data, "--out", preds, "--split", "validation",
                   *RUNTIME)[0] == 0
    inf_pred = edited(preds / "predictions.h5", tmp_path, set_array("pt_7", "dose", lambda a: a + np.inf))
    refused(nasdose("evaluate", "-q", "--pred", inf_pred, "--ref", data, "--out", tmp_path / "eval"),
            f"{inf_pred}: patient pt_7: 'dose' holds NaN or infinite values")
    assert not (tmp_path / "eval").exists()


def test_info_reports_a_patient_without_ct(tmp_path, nasdose, data):
    broken = edited(data, tmp_path, set_array("pt_3", "ct", None))
    refused(nasdose("data", "info", broken), f"{broken}: patient pt_3: no 'ct' array")


def test_search_without_validation_patients_is_refused(tmp_path, nasdose, data):
    def to_train(f: h5py.File) -> None:
        for group in f["patients"].values():
            group.attrs["split"] = "train"

    unsplit = edited(data, tmp_path, to_train)
    refused(nasdose("search", "-q", "--data", unsplit, "--out", tmp_path / "s", *SEARCH),
            f"{unsplit}: no 'validation' patients")
    assert not (tmp_path / "s").exists()


def test_predict_refuses_data_on_another_grid_than_the_model_was_trained_on(tmp_path, nasdose, run16):
    data32 = tmp_path / "d32.h5"
    write_dataset(data32, synth_patients(2, 32, seed=0), source="synth", grid=32)
    refused(nasdose("predict", "-q", "--model", run16, "--data", data32, "--out", tmp_path / "p", *RUNTIME),
            f"{run16}: the model was trained on the 16^3 grid, but the data is on the 32^3 grid")
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------------------
# 5. A refused fresh run leaves no half-made folder.

@pytest.mark.parametrize("case", ["wrong CT shape", "missing CT"])
def test_train_on_a_broken_patient_leaves_nothing(tmp_path, nasdose, data, case):
    change = (lambda a: a[:8]) if case == "wrong CT shape" else None
    broken = edited(data, tmp_path, set_array("pt_6", "ct", change))
    named = "'ct' has shape (8, 16, 16)" if change else "no 'ct' array"
    refused(nasdose("train", "-q", "--data", broken, "--out", tmp_path / "runs" / "run", *TRAIN),
            f"{broken}: patient pt_6: {named}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.h5"]


@pytest.mark.parametrize("case", ["foreign", "truncated"])
def test_distill_with_an_unusable_teacher_cache_leaves_nothing(tmp_path, nasdose, data, ensemble, case):
    cache = tmp_path / "cache.h5"
    if case == "foreign":
        shutil.copy(data, cache)
    else:
        cache.write_bytes(data.read_bytes()[:3000])
    refused(nasdose("distill", "-q", ensemble, "--student", "unet3d:widths=4,8", "--data", data,
                    "--out", tmp_path / "stu", "--teacher-cache", cache), f"{cache}: exists and is not a teacher cache")
    assert not (tmp_path / "stu").exists()


def test_pipeline_on_an_empty_folder_leaves_nothing(tmp_path, nasdose):
    (tmp_path / "empty").mkdir()
    refused(nasdose("pipeline", "-q", "--out", tmp_path / "pipe", "--data", tmp_path / "empty", "--quick"),
            "no OpenKBP patients found")
    assert not (tmp_path / "pipe").exists()


def test_nan_ct_in_search_and_predict_leaves_nothing_and_names_the_input(tmp_path, nasdose, data, run16):
    nan_ct = edited(data, tmp_path, set_array("pt_7", "ct", with_nan))
    refused(nasdose("predict", "-q", "--model", run16, "--data", nan_ct, "--out", tmp_path / "pred", *RUNTIME),
            f"{nan_ct}: patient pt_7: 'ct' holds NaN")
    refused(nasdose("search", "-q", "--data", nan_ct, "--out", tmp_path / "s", *SEARCH), f"{nan_ct}: patient pt_")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.h5"]


def test_a_refused_run_in_an_existing_empty_folder_keeps_the_folder_only(tmp_path, nasdose, data):
    out = tmp_path / "run"
    out.mkdir()
    broken = edited(data, tmp_path, set_array("pt_6", "ct", None))
    refused(nasdose("train", "-q", "--data", broken, "--out", out, *TRAIN), "no 'ct' array")
    assert out.is_dir() and list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 7. Smaller command-line errors.

def test_evaluate_reads_its_own_submission_csvs_on_a_small_grid(tmp_path, nasdose, data, run16):
    assert nasdose("predict", "-q", "--model", run16, "--data", data, "--out", tmp_path / "p",
                   "--split", "validation", *RUNTIME)[0] == 0
    code, err = nasdose("evaluate", "-q", "--pred", tmp_path / "p" / "submission", "--ref", data,
                        "--split", "validation", "--out", tmp_path / "e", "--plots", 0)
    assert code == 0, err
    assert (tmp_path / "e" / "metrics.json").is_file()


def test_usage_errors_exit_2_as_argparse_does(nasdose):
    with pytest.raises(SystemExit) as stop:
        nasdose("train", "--out", "x")  # --data missing
    assert stop.value.code == 2


def test_an_override_error_is_not_blamed_on_the_config_file(tmp_path, nasdose, data):
    out = tmp_path / "s"
    out.mkdir()
    save_yaml(out / "config.yaml", {"pool_size": 2})
    code, err = nasdose("search", "-q", "--data", data, "--out", out, "--resume", "pool_size=0")
    refused((code, err), "config key 'pool_size': must be at least 1, got 0")
    assert "config.yaml" not in err
    refused(nasdose("search", "-q", "--data", data, "--out", tmp_path / "t", "strategy=evolution",
                    "options.budget=abc"), "config key 'options.budget'")


# ---------------------------------------------------------------------------------------------
# 6. A search interrupted in its supernet training resumes it.

def test_an_interrupted_supernet_training_resumes_to_the_uninterrupted_weights(tmp_path, nasdose, data,
                                                                              kill_supernet_at, monkeypatch):
    from nas_dose.strategies import evaluator

    search = [*SEARCH[:-2], "options={budget: 1, evaluator: {supernet_steps: 8, batch_size: 1}}", "runtime.threads=1"]
    assert nasdose("search", "-q", "--data", data, "--out", tmp_path / "twin", *search)[0] == 0
    disarm = kill_supernet_at(8, checkpoint_every=3)  # killed before step 8: 6 steps checkpointed
    assert nasdose("search", "-q", "--data", data, "--out", tmp_path / "cut", *search)[0] == 130
    folder = tmp_path / "cut" / "state" / "evaluator"
    [partial] = folder.glob("supernet-*.partial.pt")
    assert torch.load(partial, weights_only=True)["step"] == 6
    disarm()
    steps = []
    loss = evaluator.masked_loss
    monkeypatch.setattr(evaluator, "masked_loss", lambda *a: steps.append(1) or loss(*a))
    assert nasdose("search", "-q", "--data", data, "--out", tmp_path / "cut", "--resume", *search)[0] == 0
    assert len(steps) == 2 and not partial.exists()  # steps 7 and 8 only, then the partial file goes
    [resumed], [whole] = ([s["model"] for s in torch.load(tmp_path / run / "supernet.pt",
                                                          weights_only=True)["supernets"]] for run in ("cut", "twin"))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


# ---------------------------------------------------------------------------------------------
# 8. A re-run ends with the artifacts of one uninterrupted run (benchmarks/chaos.py).

def log_records(text: str) -> list[dict]:
    """The records of a JSON-lines log without their wall-clock time."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in text.splitlines()]


def interrupted(*args) -> None:
    raise KeyboardInterrupt


def test_a_re_run_search_logs_its_selection_and_pool_once(tmp_path, nasdose, data):
    """A finished search re-run derives its selection and pool again from its state: the log
    keeps them once, and a pool event a kill cut short is written again, whole."""
    out, search = tmp_path / "s", [*SEARCH, "pool_size=2", "options.budget=2"]
    assert nasdose("search", "-q", "--data", data, "--out", out, *search)[0] == 0
    log = out / "search_log.jsonl"
    whole = log.read_text()
    assert [r["event"] for r in log_records(whole)][-2:] == ["selection", "pool"]
    assert nasdose("search", "-q", "--data", data, "--out", out, "--resume", *search)[0] == 0
    assert log.read_text() == whole
    log.write_text(whole[:whole.rindex('"members"')])  # killed while it wrote the pool event
    assert nasdose("search", "-q", "--data", data, "--out", out, "--resume", *search)[0] == 0
    assert log_records(log.read_text()) == log_records(whole)


def test_a_resumed_distillation_reports_the_teacher_made_as_its_twin_does(tmp_path, nasdose, data, ensemble,
                                                                          monkeypatch):
    """`teacher_recomputed` says whether the run made its teacher cache, at whichever start: a
    run stopped after making it reports it made, as its uninterrupted twin; a run given that
    cache reports it reused."""
    from nas_dose.distill import distill as distill_stage

    distill = ["distill", "-q", ensemble, "--student", "unet3d:widths=2,4", "--data", data, "--no-baseline",
               "train.epochs=1", "train.steps_per_epoch=1", "latency.size=16", "latency.runs=1", *RUNTIME]
    assert nasdose(*distill, "--out", tmp_path / "twin")[0] == 0
    with monkeypatch.context() as patch:  # stopped once the teacher's cache is made
        patch.setattr(distill_stage, "run_side_by_side", interrupted)
        assert nasdose(*distill, "--out", tmp_path / "cut")[0] == 130
    assert (tmp_path / "cut" / "teacher.h5").is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    assert nasdose(*distill, "--out", tmp_path / "cut", "--resume")[0] == 0
    assert nasdose(*distill, "--out", tmp_path / "reuse", "--teacher-cache", tmp_path / "twin" / "teacher.h5")[0] == 0
    made = {run: json.loads((tmp_path / run / "metrics.json").read_text())["teacher_recomputed"]
            for run in ("twin", "cut", "reuse")}
    assert made == {"twin": True, "cut": True, "reuse": False}
