"""Predict doses with a trained model: an HDF5 file on the data set's grid and OpenKBP CSVs (or
NIfTI, or DICOM RT Dose).

  nasdose predict --model MODEL --data DATA.h5 --out DIR [--split S] [--tta] [--no-csv]
                  [--format csv|nifti|dicom] [--preference oar=0.7,hi=0.1|measured [--sweep oar=0,0.5,1]]
                  [runtime.device=cpu runtime.amp=off ...]

DIR receives predictions.h5 (on the data set's grid; a cascade's on the source grid),
submission/pt_N.csv (the challenge's format, on the source grid: a prediction made on a
downsampled data set is upsampled back and zeroed outside the original possible-dose mask) and
config.yaml (what was predicted, how). With `format: nifti` the same source-grid doses go to
nifti/pt_N.nii.gz instead (float32 Gy, resampled back onto the grid of the patient's original
files and saved with their affine, nas_dose.data.geometry.dose_on_original; an OpenKBP patient's
grid is made from its voxel size, nas_dose.data.nifti.openkbp_geometry). With `format: dicom`
they go to dicom/pt_N.dcm, an RT Dose on the grid of the patient's CT, in its study and frame of
reference (patients imported from DICOM only; nas_dose.data.dicom).
Trailing key=value pairs set the config: `runtime.*` (device, amp, channels_last, ...), `split`,
`tta`, `csv` (false: no submission files in either format), `format`, `preference`, `sweep`.

A model conditioned on planning preferences (`model.conditioning`) predicts the dose for the
preferences `--preference` asks for (every one it takes, each in its documented range:
nas_dose.data.preferences). `--preference measured` asks, patient by patient, for the preferences
measured on the patient's own dose (its plan's `hi` and its place among the data set's training
plans, nas_dose.data.preferences.SparingScale): what `nasdose train` scores a conditioned model at
on a resampled data set, so `nasdose evaluate` of these predictions repeats its official scores. A
patient without a dose, or with preference plans (`nasdose data synth --preferences K`: several
plans at recorded preferences), has none measured: a one-line error.

`--sweep NAME=v1,v2,...` predicts one dose per value of NAME (the others as `--preference` gives
them) into DIR/NAME=v.h5, and draws each patient's DVHs of every setting over each other into
DIR/dvh/pt_N.png.

Test-time augmentation (--tta) averages the flips the training augmentation uses: along axis 0
(anterior-posterior) and axis 1 (right-left), each alone and both. A flip along one of them
mirrors the patient, so the right and left parotid channels trade places in the input, exactly
as in training; the prediction is flipped back. Axis 2 (superior-inferior) is never flipped:
training never shows the model an upside-down patient. A cascade averages the flips of both
stages: its full-resolution stage refines each flipped patient (four times the work).
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import numpy as np

from .config import ConfigError, load_config
from .data.dicom import from_dicom, write_dicom_dose
from .data.nifti import write_nifti_dose
from .data.openkbp import write_submission_csv
from .data.patient import DOSE_SCALE_GY
from .data.preferences import MEASURED, parse, parse_sweep
from .data.store import SPLITS, DataFile, write_predictions
from .errors import input_error
from .inference import (
    AtMeasured,
    Cascade,
    Predictor,
    as_predictor,
    load_at_measured,
    load_model_or_ensemble,
    load_predictor,
    open_for,
    predict_patients,
    predictions,
    with_preferences,
)
from .io import output_folder, refuse_existing, save_yaml
from .plots import cumulative_dvh, plot_dvh_sweep
from .progress import say
from .runtime import Runtime, RuntimeConfig
from .training import TrainConfig


def write_out_of_fold(data: DataFile, runs: list[Path], out: Path, runtime: Runtime) -> None:
    """The training patients' doses, each predicted by the fold run (`data.folds`) that left it
    out, into one prediction file on the data set's grid: what a cascade's full-resolution stage
    should learn from (`cascade.coarse_predictions`)."""
    records, seen = [], set[str]()
    for run in runs:
        cfg = load_config(TrainConfig, run / "config.yaml")
        held_out = cfg.data.held_out(data.ids(cfg.data.train_split))
        if not held_out or seen & set(held_out):
            raise input_error(run, "not one fold of a cross-validation (data.folds) beside the others")
        seen.update(held_out)
        predictor = load_predictor(run, runtime)
        if isinstance(predictor, Cascade):
            raise input_error(run, "a cascade's stage, not a fold of a coarse model")
        records += [(pid, dose, data.patient_attrs(pid))
                    for pid, dose in predict_patients(predictor, data, held_out, runtime)]
    write_predictions(out, records, grid=data.grid, source="out-of-fold: " + ", ".join(map(str, runs)))


# Submission formats: the folder each writes into.
FORMATS = {"csv": "submission", "nifti": "nifti", "dicom": "dicom"}


def _write_submission(folder: Path, fmt: str, pid: str, dose: np.ndarray, data: DataFile) -> None:
    """One patient's source-grid dose in the submission format `fmt`."""
    if fmt == "nifti":
        write_nifti_dose(folder / f"{pid}.nii.gz", dose, data.source_attrs(pid))
    elif fmt == "dicom":
        write_dicom_dose(folder / f"{pid}.dcm", dose, data.source_attrs(pid))
    else:
        write_submission_csv(folder / f"{pid}.csv", dose)


def write_outputs(predictor: Predictor | Cascade | AtMeasured, data: DataFile, split: str | None, runtime: Runtime,
                  out: Path, *, model: str, tta: bool = False, csv: bool = True, format: str = "csv",
                  preferences: Mapping[str, float] | Literal["measured"] | None = None) -> list[str]:
    """Predict the patients of `split` (all when None) into `out`; returns their ids.

    predictions.h5 (on the data set's grid, or on the source grid for a cascade), then the
    submission files (`csv`: unless false; `format`: submission/ CSVs, nifti/ .nii.gz or dicom/ RT Dose .dcm) whole or
    not at all (built aside, renamed into place), then config.yaml recording `model` (a path or a
    description), the data, the split and the runtime.
    """
    if format not in FORMATS:
        raise ConfigError(f"submission format: one of {', '.join(FORMATS)}, got {format!r}")
    ids = data.ids(split)
    if not ids:
        raise input_error(data.path, f"no patients in split '{split}'")
    not_dicom = [pid for pid in ids if format == "dicom" and csv and not from_dicom(data.patient_attrs(pid))]
    if not_dicom:
        raise input_error(data.path, f"patients not imported from DICOM, so without a CT to align an RT Dose with: "
                                     f"{', '.join(not_dicom[:5])}{', ...' if len(not_dicom) > 5 else ''} "
                                     "(use --format csv or nifti)")
    submission = out / FORMATS[format]
    staging = out / f".{submission.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)

    grid, doses = predictions(predictor, data, ids, runtime, tta)
    cascade = grid != data.grid

    def records() -> Iterator[tuple[str, np.ndarray, dict]]:
        for pid, dose in doses:
            if csv:
                _write_submission(staging, format, pid, dose if cascade else data.to_source_grid(pid, dose), data)
            yield pid, dose, data.source_attrs(pid) if cascade else data.patient_attrs(pid)

    try:
        write_predictions(out / "predictions.h5", records(), grid=grid, source=model, total=len(ids))
        for folder in FORMATS.values():  # never leave submission files of an earlier run
            shutil.rmtree(out / folder, ignore_errors=True)
        if csv:
            staging.rename(submission)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    save_yaml(out / "config.yaml", {"model": model, "data": str(data.path), "split": split, "tta": tta,
                                    "csv": csv, "format": format, "runtime": runtime.describe(),
                                    **({"preferences": preferences if isinstance(preferences, str)
                                        else dict(preferences)} if preferences else {})})
    return ids


DVH_BINS_GY = np.linspace(0.0, 1.3 * DOSE_SCALE_GY, 400)  # the sweep figures' dose axis


def write_sweep(model_path: Path, data: DataFile, split: str | None, runtime: Runtime, out: Path,
                fixed: Mapping[str, float], name: str, values: list[float], tta: bool = False) -> list[str]:
    """One prediction file per value of preference `name` (the others `fixed`), DIR/NAME=v.h5,
    and per patient the DVHs of every setting overlaid (DIR/dvh/pt_N.png); returns the ids."""
    ids = data.ids(split)
    if not ids:
        raise input_error(data.path, f"no patients in split '{split}'")
    model = load_model_or_ensemble(model_path, data.grid, data.extra_channels)
    curves: dict[str, dict[str, dict[str, np.ndarray]]] = {pid: {} for pid in ids}
    for value in values:
        setting = {**fixed, name: value}
        predictor = as_predictor(model_path, with_preferences(model_path, model, setting), runtime, data.grid)
        label = f"{name}={value:g}"

        def records(label: str = label, predictor: Predictor | Cascade = predictor
                    ) -> Iterator[tuple[str, np.ndarray, dict]]:
            for pid, dose in predictions(predictor, data, ids, runtime, tta)[1]:
                structures = data.read(pid).structures
                curves[pid][label] = {roi: cumulative_dvh(dose, mask, DVH_BINS_GY)
                                      for roi, mask in structures.items() if mask.any()}
                yield pid, dose, data.patient_attrs(pid)

        write_predictions(out / f"{label}.h5", records(), grid=data.grid, total=len(ids),
                          source=f"{model_path} at " + ",".join(f"{k}={v:g}" for k, v in setting.items()))
    others = ", ".join(f"{k}={v:g}" for k, v in fixed.items() if k != name)
    for pid in ids:
        plot_dvh_sweep(DVH_BINS_GY, curves[pid], out / "dvh" / f"{pid}.png",
                       title=f"{pid}: {name} swept" + (f" ({others})" if others else ""))
    save_yaml(out / "config.yaml", {"model": str(model_path), "data": str(data.path), "split": split, "tta": tta,
                                    "preferences": dict(fixed), "sweep": {name: values},
                                    "runtime": runtime.describe()})
    return ids


@dataclass
class Config:
    """What to predict and how the networks run (the same `runtime` section as every other
    command's config); `split`: None predicts every patient; `tta`: flip test-time augmentation;
    `csv`: false writes no submission files; `format`: csv (OpenKBP), nifti or dicom (RT Dose)."""

    split: str | None = None
    tta: bool = False
    csv: bool = True
    format: str = "csv"
    preference: str | None = None  # a conditioned model's preferences, e.g. "oar=0.7,hi=0.1", or "measured"
    sweep: str | None = None  # one preference and its values, e.g. "oar=0,0.25,0.5,0.75,1"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"config key 'format': one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.split is not None and self.split not in SPLITS:
            raise ConfigError(f"config key 'split': one of {', '.join(SPLITS)}, got {self.split!r}")


@dataclass(frozen=True)
class Inputs:
    model: Path  # a training run folder (its best.pt), a checkpoint or an ensemble .yaml
    data: Path  # a nasdose data set


def run(config: Config, inputs: Inputs, out: Path, resume: bool = False, *, force: bool = False) -> list[str]:
    """Predict into `out`; returns the patients predicted. Nothing to resume: a prediction is
    made again whole (written atomically); an earlier one in `out` is replaced only with `force`."""
    runtime = Runtime(config.runtime)
    measured = config.preference == MEASURED
    fixed = parse(config.preference) if config.preference and not measured else None
    swept = parse_sweep(config.sweep) if config.sweep else None
    if swept is not None and measured:
        raise ConfigError("config key 'preference': a sweep holds the other preferences at values, not 'measured'")
    with output_folder(out), open_for(inputs.data, inputs.model) as data:
        refuse_existing([Path(out) / "predictions.h5", *(Path(out) / f for f in FORMATS.values())], force)
        if data.kind != "dataset":
            raise input_error(inputs.data, "is a prediction file, not a data set")
        if swept is not None:
            ids = write_sweep(inputs.model, data, config.split, runtime, Path(out), fixed or {}, *swept, tta=config.tta)
            say(f"predicted {len(ids)} patients at {len(swept[1])} settings of {swept[0]}: {out}/{swept[0]}=*.h5, "
                f"{out}/dvh/")
            return ids
        extra = data.extra_channels
        predictor = (load_at_measured(inputs.model, runtime, data.grid, extra) if measured
                     else load_predictor(inputs.model, runtime, data.grid, fixed, extra))
        ids = write_outputs(predictor, data, config.split, runtime, Path(out), model=str(inputs.model), tta=config.tta,
                            csv=config.csv, format=config.format, preferences=MEASURED if measured else fixed)
    say(f"predicted {len(ids)} patients: {Path(out) / 'predictions.h5'}"
        + (f", {Path(out) / FORMATS[config.format]}/" if config.csv else ""))
    return ids

