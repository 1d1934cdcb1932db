"""Every command that writes refuses an existing output with one line naming it and exit status 1,
unless --force; --force replaces it (a run folder is emptied first, so nothing of the earlier run
is resumed or reused); --resume still continues, and --resume with --force is a usage error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nas_dose import pipeline
from nas_dose.cli import main
from nas_dose.io import load_yaml
from nas_dose.pool import MATRICES, Pool, PoolMember, save_pool
from nas_dose.search_spaces import get_space

# A U-Net that trains on the 16³ phantoms in about a second.
TINY = ["model.kwargs.widths=[4, 8, 16]", "data.augment.enabled=false", "runtime.device=cpu", "runtime.threads=1"]
RUNTIME = ["runtime.device=cpu", "runtime.threads=1"]


@pytest.fixture
def nasdose(capsys):
    """Run the CLI quietly; returns (exit status, stderr)."""

    def run(*argv: object) -> tuple[int, str]:
        capsys.readouterr()
        status = main(["-q", *map(str, argv)])
        return status, capsys.readouterr().err

    return run


def refused(result: tuple[int, str], path: Path) -> bool:
    status, err = result
    return status == 1 and err.count("\n") == 1 and f"{path}" in err and "--force" in err


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished 2-epoch run."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["-q", "train", "--data", str(data), "--out", str(out), "epochs=2", *TINY]) == 0
    return out


def test_train_refuses_a_finished_run_and_force_starts_afresh(trained, data, tmp_path, nasdose):
    out = tmp_path / "run"
    assert nasdose("train", "--data", data, "--out", out, "epochs=2", *TINY)[0] == 0
    (out / "notes.txt").write_text("of the earlier run\n")
    best = (out / "best.pt").read_bytes()
    assert refused(nasdose("train", "--data", data, "--out", out, "epochs=1", *TINY), out)
    assert (out / "best.pt").read_bytes() == best and (out / "notes.txt").exists()
    assert nasdose("train", "--data", data, "--out", out, "epochs=2", "--resume", *TINY)[0] == 0  # resume: kept
    assert (out / "notes.txt").exists()
    assert nasdose("train", "--data", data, "--out", out, "epochs=1", "--force", *TINY)[0] == 0
    assert not (out / "notes.txt").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log if e["val_dose_score"] is not None] == [1]  # only the new run's epoch
    assert load_yaml(out / "config.yaml")["epochs"] == 1


def test_resume_and_force_together_are_a_usage_error(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--resume", "--force"])
    assert exit.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_predict_evaluate_and_export_refuse_their_earlier_outputs(trained, data, tmp_path, nasdose):
    pred, scores, export = tmp_path / "pred", tmp_path / "eval", tmp_path / "export"
    commands = {
        "predict": (["predict", "--model", trained, "--data", data, "--out", pred, "--split", "validation",
                     *RUNTIME], pred / "predictions.h5"),
        "evaluate": (["evaluate", "--pred", pred / "predictions.h5", "--ref", data, "--out", scores,
                      "--plots", "1"], scores / "metrics.json"),
        "export": (["export", "--model", trained, "--out", export, "--format", "pt2", "check_grid=16"],
                   export / "model.yaml"),
    }
    for argv, output in commands.values():
        assert nasdose(*argv)[0] == 0
        output.write_bytes(output.read_bytes() + b"\n")  # marked, to see whether it is replaced
        before = output.read_bytes()
        assert refused(nasdose(*argv), output)
        assert output.read_bytes() == before
        assert nasdose(*argv, "--force")[0] == 0
        assert output.read_bytes() != before


def test_data_import_refuses_an_existing_file(tmp_path, nasdose):
    out = tmp_path / "d.h5"
    out.write_bytes(b"earlier")
    assert refused(nasdose("data", "import", tmp_path / "missing", out), out)
    assert out.read_bytes() == b"earlier"
    status, err = nasdose("data", "import", tmp_path / "missing", out, "--force")  # gets past the check
    assert status == 1 and "missing" in err and out.read_bytes() == b"earlier"


def earlier_run(folder: Path) -> Path:
    """A folder as a finished run leaves it: config.yaml, a member or student, a stray file."""
    for sub in ("members/m0", "student"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "best.pt").write_bytes(b"weights")
    (folder / "config.yaml").write_text("seed: 0\n")
    return folder


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory) -> Path:
    space = get_space("lenas")
    genotype = space.sample(np.random.RandomState(0), macro=space.small_macro())
    path = tmp_path_factory.mktemp("pool") / "pool.yaml"
    members = [PoolMember("m0", genotype, 1.0)]
    save_pool(path, Pool("lenas", "hand", 0, members, {k: np.zeros((1, 1)) for k in MATRICES}))
    return path


@pytest.mark.parametrize("command", ["search", "ensemble", "distill"])
def test_run_folders_are_replaced_only_with_force(command, data, trained, pool_file, tmp_path, nasdose):
    """The earlier run is refused before any work; with --force it is removed before the new run
    starts (which then stops at its own bad input: a missing data set, pool or teacher)."""
    out = earlier_run(tmp_path / "out")
    missing = tmp_path / "missing"

    def argv(given: Path) -> list[object]:
        return {"search": ["search", "--data", given, "--out", out, "strategy=random", "macro.stem=4",
                           "macro.widths=[8]"],
                "ensemble": ["ensemble", given, "--data", data, "--out", out],
                "distill": ["distill", given, "--student", "unet3d:widths=4,8", "--data", data, "--out", out]}[command]

    assert refused(nasdose(*argv({"search": data, "ensemble": pool_file, "distill": trained}[command]), *RUNTIME), out)
    assert (out / "members" / "m0" / "best.pt").exists()
    status, err = nasdose(*argv(missing), "--force")
    assert status == 1 and f"{missing}" in err and "--force" not in err
    assert list(out.iterdir()) == []


def test_pipeline_with_force_starts_afresh(tmp_path, nasdose, monkeypatch):
    out = earlier_run(tmp_path / "pipe")
    seen = []
    monkeypatch.setattr(pipeline, "run_stages", lambda ctx: seen.append(sorted(p.name for p in ctx.out.iterdir())))
    monkeypatch.setattr(pipeline, "report", lambda ctx: "")
    assert nasdose("pipeline", "--out", out, "--quick")[0] == 0
    assert nasdose("pipeline", "--out", out, "--quick", "--force")[0] == 0
    assert seen == [[".nasdose.lock", "config.yaml", "members", "student"], [".nasdose.lock"]]
