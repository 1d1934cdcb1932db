"""`logging.tensorboard=true`: TensorBoard event files in the run folder, read back with
TensorBoard's own reader and checked against the JSON logs; off by default; a clear error
without the package."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nas_dose.cli import main
from nas_dose.config import ConfigError, load_config
from nas_dose.models.factory import build_model
from nas_dose.search_spaces import get_space
from nas_dose.training import TrainConfig, train_model

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

TINY = ["model.kwargs.widths=[4, 8, 16]", "data.augment.enabled=false", "runtime.device=cpu", "runtime.threads=1"]


def events(folder: Path) -> event_accumulator.EventAccumulator:
    board = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    board.Reload()
    return board


def curve(board: event_accumulator.EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in board.Scalars(tag)}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_writes_loss_validation_and_learning_rate(data, tmp_path):
    out = tmp_path / "run"
    assert main(["-q", "train", "--data", str(data), "--out", str(out), "epochs=2", "log_every=2",
                 "logging.tensorboard=true", *TINY]) == 0
    board = events(out)
    assert {"train/loss", "train/lr", "val/dose_score", "val/best_dose_score"} <= set(board.Tags()["scalars"])
    log = records(out / "log.jsonl")
    assert len(log) > 2  # entries within epochs too
    assert curve(board, "train/loss") == pytest.approx({e["step"]: e["loss"] for e in log}, rel=1e-6)
    assert curve(board, "train/lr") == pytest.approx({e["step"]: e["lr"] for e in log}, rel=1e-6)
    val = {e["step"]: e["val_dose_score"] for e in log if e["val_dose_score"] is not None}
    assert len(val) == 2 and curve(board, "val/dose_score") == pytest.approx(val, rel=1e-6)
    best = json.loads((out / "metrics.json").read_text())["best_val_dose_score"]
    assert min(curve(board, "val/best_dose_score").values()) == pytest.approx(best, rel=1e-6)


def test_off_by_default(data, tmp_path):
    out = tmp_path / "run"
    assert main(["-q", "train", "--data", str(data), "--out", str(out), "epochs=1", *TINY]) == 0
    assert not list(out.rglob("events.out.tfevents.*"))
    assert not load_config(TrainConfig).logging.tensorboard


def test_without_the_package_the_config_is_refused(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"logging.tensorboard.*pip install 'nasdose\[tensorboard\]'"):
        load_config(TrainConfig, overrides=["logging.tensorboard=true"])
    out = tmp_path / "run"
    assert main(["-q", "train", "--data", str(data), "--out", str(out), "logging.tensorboard=true", *TINY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install" in err and not out.exists()


def test_a_differentiable_search_writes_its_losses_and_architecture_weights(data, tmp_path):
    out = tmp_path / "search"
    assert main(["-q", "search", "--data", str(data), "--out", str(out), "logging.tensorboard=true",
                 "macro.stem=4", "macro.widths=[8]", "pool_size=1", "diversity.mode=none", "options.epochs=2",
                 "options.steps_per_epoch=1", "options.candidates=1", "runtime.device=cpu",
                 "runtime.threads=1"]) == 0
    board = events(out)
    epochs = [r for r in records(out / "search_log.jsonl") if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for key in ("weight_loss", "arch_loss", "tau", "score"):
        assert curve(board, f"search/{key}") == pytest.approx({r["epoch"]: r[key] for r in epochs}, rel=1e-6)
    tags = set(board.Tags()["scalars"])
    alpha = sorted(t for t in tags if t.startswith("search/alpha/"))
    slots = epochs[0]["arch_weights"]
    assert len(alpha) == sum(len(p) for p in slots.values())
    space = get_space("lenas")
    space, _ = space.fitted(space.check_macro({"stem": 4, "widths": [8]}, "macro"), 16)
    for r in epochs:
        for slot, probs in r["arch_weights"].items():
            ops = [f"search/alpha/{slot}/{op}" for op in space.slots()[slot]]
            assert [curve(board, t)[r["epoch"]] for t in ops] == pytest.approx(probs, rel=1e-6)
    assert curve(board, alpha[0]).keys() == {0, 1, 2}  # the start, then every epoch
    assert set(board.Tags()["histograms"]) == {f"search/alpha/{s}" for s in slots}


class Interrupt(Exception):
    pass


def test_a_resumed_run_replaces_what_it_logs_again(data, tmp_path):
    """Killed at step 5, checkpointed at 4: the resumed run logs 5 again, and the curve holds each
    step once, as log.jsonl does."""
    cfg = load_config(TrainConfig, overrides=[*TINY, "epochs=2", "log_every=1", "checkpoint_every=2",
                                              "logging.tensorboard=true"])

    def stop(step: int) -> None:
        if step == 5:
            raise Interrupt

    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_model(build_model(cfg.model), cfg, data, run, on_step=stop)
    train_model(build_model(cfg.model), cfg, data, run, resume=True)
    steps = [e.step for e in events(run).Scalars("train/loss")]
    log = records(run / "log.jsonl")
    assert steps == [e["step"] for e in log] == list(range(1, 7))
    assert curve(events(run), "train/loss") == pytest.approx({e["step"]: e["loss"] for e in log}, rel=1e-6)
