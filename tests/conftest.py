"""Shared fixtures: a small synthetic data set, the real OpenKBP data (skipped when absent), and
one torch thread.

The tests use tiny tensors, where a second thread only adds synchronization (and, when the
cores are busy, spin-waiting that makes a test many times slower).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from nas_dose.config import load_config
from nas_dose.data.patient import Patient
from nas_dose.data.resample import downsample_patient
from nas_dose.data.store import write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.models.factory import build_model
from nas_dose.progress import set_quiet
from nas_dose.runtime import seed_everything
from nas_dose.strategies import evaluator
from nas_dose.training import TrainConfig, train_model

torch.set_num_threads(1)

_DEFAULT_OPENKBP = Path(__file__).resolve().parents[1].parent / "shared" / "openkbp"


@pytest.fixture(autouse=True)
def _process_settings():
    """Undo what a command changes for the whole process (runtime.threads, --quiet)."""
    yield
    torch.set_num_threads(1)
    set_quiet(False)


def _synth16(tmp_path_factory, name: str, patients: Iterable[Patient], source: str = "synth",
             total: int | None = None) -> Path:
    """A data set of `patients` (phantoms on a 16³ grid) for fixtures that share it read only."""
    path = tmp_path_factory.mktemp("data") / name
    write_dataset(path, patients, source=source, grid=16, total=total)
    return path


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """8 phantoms on a 16³ grid: 6 train (3 batches of 2), 2 validation. Shared by the whole
    session, so read only; a module that needs other data defines its own `data`."""
    return _synth16(tmp_path_factory, "synth16.h5", synth_patients(8, 16, seed=0))


@pytest.fixture(scope="session")
def search_data(tmp_path_factory) -> Path:
    """10 phantoms on a 16³ grid, for the search tests (read only)."""
    return _synth16(tmp_path_factory, "synth16_10.h5", synth_patients(10, 16, seed=0), total=10)


@pytest.fixture(scope="session")
def plan_data(tmp_path_factory) -> Path:
    """`data`'s 8 phantoms, each with 4 preference plans (read only)."""
    return _synth16(tmp_path_factory, "synth16_plans.h5", synth_patients(8, 16, seed=0, preferences=4))


@pytest.fixture(scope="session")
def resampled_data(tmp_path_factory) -> Path:
    """8 phantoms made on a 32³ grid and stored downsampled by 2 (16³), one plan each: as OpenKBP
    (read only)."""
    return _synth16(tmp_path_factory, "coarse16.h5", (downsample_patient(p, 2) for p in synth_patients(8, 32, seed=0)),
                    source="synth32")


@pytest.fixture(scope="session")
def unlabeled_data(tmp_path_factory) -> Path:
    """`data`'s 8 phantoms and 4 more in the "unlabeled" split, without a dose (read only)."""
    return _synth16(tmp_path_factory, "synth16_unlabeled.h5", synth_patients(8, 16, seed=0, unlabeled=4))


@pytest.fixture(scope="session")
def openkbp_dir() -> Path:
    """The shared OpenKBP folder (`NASDOSE_OPENKBP` overrides); the test skips when it is absent."""
    path = Path(os.environ.get("NASDOSE_OPENKBP", _DEFAULT_OPENKBP))
    if not (path / "csv").is_dir():
        pytest.skip(f"OpenKBP data not found at {path}")
    return path


@pytest.fixture(scope="session")
def train_tiny():
    """Train a tiny U-Net (widths 4, 8, 16) for one epoch on a data set into a run folder: a
    real model, in seconds, for the tests of what reads one (predict and its formats)."""

    def train(data: Path, out: Path) -> Path:
        cfg = load_config(TrainConfig, overrides=["model.kwargs.widths=[4, 8, 16]", "epochs=1", "runtime.device=cpu",
                                                  "runtime.threads=1", "data.augment.enabled=false"])
        seed_everything(0)
        train_model(build_model(cfg.model), cfg, data, out)
        return out

    return train


@pytest.fixture
def cut_training(monkeypatch):
    """`cut_training(module, step)`: `module`'s train_model stops its run, as Ctrl-C does, once it
    reaches `step`; `cut_training(module, None)` gives it back the plain train_model."""

    def cut(module, step: int | None) -> None:
        def stop(at: int) -> None:
            if at == step:
                raise KeyboardInterrupt

        monkeypatch.setattr(module, "train_model",
                            train_model if step is None else functools.partial(train_model, on_step=stop))

    return cut


@pytest.fixture
def kill_supernet_at(monkeypatch):
    """`arm(at, checkpoint_every)`: the evaluator then checkpoints its supernet training every
    `checkpoint_every` steps and is killed (KeyboardInterrupt) when it draws its `at`-th path,
    just before step `at`; `arm` returns what disarms it (for the resumed run)."""
    def arm(at: int, checkpoint_every: int):
        monkeypatch.setattr(evaluator, "CHECKPOINT_EVERY", checkpoint_every)
        draws: list[int] = []
        draw = evaluator.random_path

        def killed(*args):
            draws.append(1)
            if len(draws) == at:
                raise KeyboardInterrupt
            return draw(*args)

        monkeypatch.setattr(evaluator, "random_path", killed)
        return lambda: monkeypatch.setattr(evaluator, "random_path", draw)

    return arm
