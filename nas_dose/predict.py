"""Predict doses with a trained model: an HDF5 file on the data set's grid and OpenKBP CSVs.

  nasdose predict --model MODEL --data DATA.h5 --out DIR [--split S] [--tta] [--no-csv]
                  [device=cpu amp=off ...]

DIR receives predictions.h5 (on the data set's grid), submission/pt_N.csv (the challenge's
format, on the source grid: a prediction made on a downsampled data set is upsampled back and
zeroed outside the original possible-dose mask) and config.yaml (what was predicted, how).
Trailing key=value pairs set the runtime (device, amp, channels_last, ...).

Test-time augmentation (--tta) averages the flips the training augmentation uses: along axis 0
(anterior-posterior) and axis 1 (right-left), each alone and both. A flip along one of them
mirrors the patient, so the right and left parotid channels trade places in the input, exactly
as in training; the prediction is flipped back. Axis 2 (superior-inferior) is never flipped:
training never shows the model an upside-down patient.
"""
from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .cascade import CascadeConfig, Refiner, predict_source, source_grids
from .config import add_config_arguments, from_dict, load_config
from .data.augment import Transform
from .data.dataset import INPUT_LAYOUT, build_input
from .data.openkbp import write_submission_csv
from .data.patient import DOSE_SCALE_GY
from .data.store import SPLITS, DataFile, open_data, write_predictions
from .errors import input_error
from .io import output_folder, save_yaml
from .progress import say
from .runtime import Runtime, RuntimeConfig
from .scores import Scores, score_on_source, score_patients

# Flip combinations of (axis 0, axis 1) that test-time augmentation averages over.
TTA_FLIPS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))


class Predictor(Protocol):
    """Input batch (N, IN_CHANNELS, D, H, W) on the runtime's device -> dose / 70 (N, 1, D, H, W).

    A model in eval mode is one; an ensemble is any callable that averages its members.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def _flip(x: torch.Tensor, flips: tuple[bool, bool]) -> torch.Tensor:
    dims = [axis + 2 for axis, flipped in enumerate(flips) if flipped]
    return x.flip(dims) if dims else x


def _mirror_channels(x: torch.Tensor) -> torch.Tensor:
    """Swap the channels of paired left/right structures (a mirrored right parotid is a left one)."""
    order = list(range(x.shape[1]))
    for right, left in INPUT_LAYOUT.mirror_pairs:
        order[right], order[left] = left, right
    return x[:, order]


def flip_tta(predictor: Predictor, x: torch.Tensor) -> torch.Tensor:
    """Mean of the predictions over TTA_FLIPS, each flipped back to the original orientation."""
    total = None
    for flips in TTA_FLIPS:
        xi = _flip(x, flips)
        if Transform(flips=flips).mirrors:
            xi = _mirror_channels(xi)
        yi = _flip(predictor(xi).float(), flips)
        total = yi if total is None else total + yi
    return total / len(TTA_FLIPS)


def predict_patients(predictor: Predictor, data: DataFile, ids: list[str], runtime: Runtime,
                     tta: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(id, dose in Gy on the data set's grid) per patient: non-negative, zero outside the mask."""
    for pid in ids:
        patient = data.read(pid)
        x = runtime.to_device(torch.from_numpy(build_input(patient))[None])
        with torch.inference_mode(), runtime.autocast():
            y = flip_tta(predictor, x) if tta else predictor(x)
        dose = y.float()[0, 0].cpu().numpy() * DOSE_SCALE_GY
        yield pid, np.where(patient.possible_dose_mask, np.maximum(dose, 0), 0).astype(np.float32)


@dataclass
class Cascade:
    """A coarse predictor and the refiner that takes its dose to the source grid."""

    coarse: Predictor
    refiner: torch.nn.Module
    config: CascadeConfig

    def predict(self, data: DataFile, ids: list[str], runtime: Runtime,
                tta: bool = False) -> Iterator[tuple[str, np.ndarray]]:
        """(id, source-grid dose in Gy) per patient; `tta` averages the coarse stage's flips."""
        factor = source_grids(data, ids)
        for pid, coarse in predict_patients(self.coarse, data, ids, runtime, tta):
            yield pid, predict_source(self.refiner, data.read_source(pid), coarse, factor, self.config,
                                      runtime.device)


def load_predictor(path: Path, runtime: Runtime, grid: int | None = None) -> Predictor | Cascade:
    """A run folder, a checkpoint or an ensemble's .yaml, on the runtime's device, in eval mode;
    with `grid`, refused unless trained on that grid. A cascade's full-resolution run comes with
    its coarse stage (the run's `cascade.coarse`)."""
    # Imported here: nas_dose.ensemble and nas_dose.train import this module.
    from .ensemble import load_predictor as load_model_or_ensemble
    from .train import load_model

    model = load_model_or_ensemble(path, grid)
    if not isinstance(model, Refiner):
        return runtime.prepare(model).eval()
    cfg = from_dict(CascadeConfig, load_model(path)[1]["config"].get("cascade"))
    if cfg.coarse is None or Path(cfg.coarse).resolve() == Path(path).resolve():
        raise input_error(path, "a refiner whose config names no coarse stage (cascade.coarse)")
    coarse = load_predictor(Path(cfg.coarse), runtime, grid)
    if isinstance(coarse, Cascade):
        raise input_error(path, f"its coarse stage {cfg.coarse} is itself a cascade")
    return Cascade(coarse, runtime.prepare(model).eval(), cfg)


def official_scores(predictor: Predictor | Cascade, data: DataFile, ids: list[str], runtime: Runtime,
                    tta: bool = False) -> Scores:
    """The OpenKBP scores of a model's or a cascade's doses, on the source grid."""
    if isinstance(predictor, Cascade):
        return score_patients((data.read_source(pid), dose) for pid, dose in predictor.predict(data, ids, runtime, tta))
    return score_on_source(data, predict_patients(predictor, data, ids, runtime, tta))


def write_out_of_fold(data: DataFile, runs: list[Path], out: Path, runtime: Runtime) -> None:
    """The training patients' doses, each predicted by the fold run (`data.folds`) that left it
    out, into one prediction file on the data set's grid: what a cascade's full-resolution stage
    should learn from (`cascade.coarse_predictions`)."""
    # Imported here: nas_dose.train imports this module.
    from .train import TrainConfig

    records, seen = [], set()
    for run in runs:
        cfg = load_config(TrainConfig, run / "config.yaml")
        held_out = cfg.data.held_out(data.ids(cfg.data.train_split))
        if not held_out or seen & set(held_out):
            raise input_error(run, "not one fold of a cross-validation (data.folds) beside the others")
        seen.update(held_out)
        records += [(pid, dose, data.patient_attrs(pid))
                    for pid, dose in predict_patients(load_predictor(run, runtime), data, held_out, runtime)]
    write_predictions(out, records, grid=data.grid, source="out-of-fold: " + ", ".join(map(str, runs)))


def write_outputs(predictor: Predictor | Cascade, data: DataFile, split: str | None, runtime: Runtime, out: Path,
                  *, model: str, tta: bool = False, csv: bool = True) -> list[str]:
    """Predict the patients of `split` (all when None) into `out`; returns their ids.

    predictions.h5 (on the data set's grid, or on the source grid for a cascade), then submission/ whole or not at all (built aside, renamed into place), then
    config.yaml recording `model` (a path or a description), the data, the split and the runtime.
    """
    ids = data.ids(split)
    if not ids:
        raise input_error(data.path, f"no patients in split '{split}'")
    submission, staging = out / "submission", out / ".submission.partial"
    shutil.rmtree(staging, ignore_errors=True)

    cascade = isinstance(predictor, Cascade)
    doses = predictor.predict(data, ids, runtime, tta) if cascade else predict_patients(predictor, data, ids,
                                                                                         runtime, tta)

    def records() -> Iterator[tuple[str, np.ndarray, dict]]:
        for pid, dose in doses:
            if csv:
                write_submission_csv(staging / f"{pid}.csv", dose if cascade else data.to_source_grid(pid, dose))
            yield pid, dose, data.source_attrs(pid) if cascade else data.patient_attrs(pid)

    grid = data.source_grid(ids[0]) if cascade else data.grid
    try:
        write_predictions(out / "predictions.h5", records(), grid=grid, source=model, total=len(ids))
        shutil.rmtree(submission, ignore_errors=True)  # never leave CSVs of an earlier run
        if csv:
            staging.rename(submission)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    save_yaml(out / "config.yaml", {"model": model, "data": str(data.path), "split": split, "tta": tta,
                                    "csv": csv, "runtime": runtime.describe()})
    return ids


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="MODEL",
                        help="training run folder (its best.pt), a checkpoint file or an ensemble .yaml")
    parser.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="nasdose data set")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--split", choices=SPLITS, help="predict this split only (default: every patient)")
    parser.add_argument("--tta", action="store_true",
                        help="average over flips along axes 0 and 1 (test-time augmentation)")
    parser.add_argument("--no-csv", dest="csv", action="store_false",
                        help="skip the OpenKBP submission CSVs")
    add_config_arguments(parser)


@dataclass
class PredictConfig:
    """How the networks run (the same `runtime` section as every other command's config)."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def main(args: argparse.Namespace) -> None:
    runtime = Runtime(load_config(PredictConfig, args.config, args.overrides).runtime)
    with output_folder(args.out), open_data(args.data) as data:
        if data.kind != "dataset":
            raise input_error(args.data, "is a prediction file, not a data set")
        predictor = load_predictor(args.model, runtime, data.grid)
        ids = write_outputs(predictor, data, args.split, runtime, args.out, model=str(args.model),
                            tta=args.tta, csv=args.csv)
    say(f"predicted {len(ids)} patients: {args.out / 'predictions.h5'}"
        + (f", {args.out / 'submission'}/" if args.csv else ""))
