"""Score predicted doses with the official OpenKBP dose and DVH scores.

PRED is a folder of submission CSVs (pt_N.csv) or a nasdose predictions HDF5; DATA is an OpenKBP
tree (CSV or npz layout) or a nasdose data set HDF5. Prints the scores and the per-structure
table, writes OUT/metrics.json and, for the first N patients, a DVH plot and an axial dose-slice
plot under OUT/plots/.
"""
from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

import numpy as np

from .config import ConfigError, at_least
from .data.openkbp import OPENKBP_SHAPE, discover, natural_key, read_patient, read_submission_csv
from .data.patient import Patient
from .data.store import SPLITS, DataFile, open_data
from .errors import NasDoseError, input_error
from .io import output_folder, refuse_existing, save_json
from .plots import plot_dose_slices, plot_dvh
from .progress import progress, say
from .scores import Scores, score_patients

T = TypeVar("T")


@dataclass
class _Source(Generic[T]):
    """Patients of one input by id, read on demand; `file_of` names the file an error is about.
    A prediction's `read` also takes the reference's shape (a submission CSV does not say it)."""

    path: Path
    ids: list[str]
    read: Callable[..., T]
    file_of: Callable[[str], Path]


def _open_predictions(path: Path, stack: ExitStack) -> _Source[np.ndarray]:
    if path.is_dir():
        files = {f.stem: f for f in path.glob("*.csv") if not f.name.startswith(".")}
        if not files:
            raise input_error(path, "no submission CSVs (pt_N.csv) in this folder")
        return _Source(path, sorted(files, key=natural_key),
                       lambda pid, shape: _read_csv(files[pid], shape), files.__getitem__)
    data = stack.enter_context(open_data(path))
    if data.kind != "predictions":
        raise input_error(path, f"a nasdose {data.kind} file, expected predictions")
    return _Source(path, data.ids(), lambda pid, shape: data.read_dose(pid), lambda pid: path)


def _read_csv(file: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """A submission CSV on the reference's grid (nasdose writes them on a data set's source
    grid), else on the challenge's 128³, so that one of another grid is reported as such."""
    try:
        return read_submission_csv(file, shape)
    except NasDoseError:
        if shape == OPENKBP_SHAPE:
            raise
        return read_submission_csv(file)


def _open_references(path: Path, split: str | None, stack: ExitStack) -> _Source[Patient]:
    """Reference patients on their source grid, where the official scores are computed."""
    if path.is_file() and path.suffix != ".npz":
        data = stack.enter_context(open_data(path))
        if data.kind != "dataset":
            raise input_error(path, f"a nasdose {data.kind} file, expected a data set")
        return _Source(path, data.ids(split), data.read_source, lambda pid: path)
    sources = {s.id: s for s in discover(path) if split is None or s.split == split}
    return _Source(path, list(sources), lambda pid: read_patient(sources[pid]),
                   lambda pid: sources[pid].path)


def _on_source_grid(preds: _Source[np.ndarray], data: DataFile) -> _Source[np.ndarray]:
    """Predictions on a resampled data set's own grid, read upsampled to the source grid (as
    `nasdose predict` writes its CSVs); predictions already there are read as they are."""

    def read(pid: str, shape: tuple[int, int, int]) -> np.ndarray:
        dose = preds.read(pid, shape)
        return data.to_source_grid(pid, dose) if dose.shape == (data.grid,) * 3 != shape else dose

    return _Source(preds.path, preds.ids, read, preds.file_of)


def _patient_ids(preds: _Source[np.ndarray], refs: _Source[Patient],
                 split: str | None) -> list[str]:
    """Every predicted patient, or with a split every reference patient of it (all predicted)."""
    if split is None:
        known = set(refs.ids)
        for pid in preds.ids:
            if pid not in known:
                raise input_error(refs.path, f"no reference patient {pid} "
                                             f"(predicted in {preds.file_of(pid)})")
        return preds.ids
    if not refs.ids:
        raise input_error(refs.path, f"no {split} patients")
    predicted = set(preds.ids)
    missing = [pid for pid in refs.ids if pid not in predicted]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise input_error(preds.path, f"no prediction for {split} patient(s) "
                                      f"{', '.join(missing[:5])}{more}")
    return refs.ids


def _pairs(preds: _Source[np.ndarray], refs: _Source[Patient], ids: list[str],
           plot_dir: Path | None, plots: int) -> Iterator[tuple[Patient, np.ndarray]]:
    """Read each patient and its prediction (checked), plotting the first `plots` of them."""
    for i, pid in enumerate(progress(ids, desc="scoring")):
        patient = refs.read(pid)
        if patient.dose is None:
            raise input_error(refs.file_of(pid), f"patient {pid} has no reference dose")
        dose = preds.read(pid, patient.dose.shape)
        if dose.shape != patient.dose.shape:
            raise input_error(preds.file_of(pid),
                              f"patient {pid}: predicted dose on a {dose.shape} grid, but the "
                              f"reference {refs.file_of(pid)} is on a {patient.dose.shape} grid")
        if plot_dir is not None and i < plots:
            plot_dvh(patient.dose, dose, patient.structures, plot_dir / f"dvh_{pid}.png",
                     title=f"{pid}: reference (solid) and prediction (dashed)")
            plot_dose_slices(patient.ct, patient.dose, dose, plot_dir / f"slices_{pid}.png",
                             ptv70=patient.structures.get("PTV70"), title=pid)
        yield patient, dose


def evaluate_predictions(pred: Path, ref: Path, out: Path | None, split: str | None = None,
                         plots: int = 3) -> Scores:
    """Score `pred` against `ref` and print the scores; with `out`, write metrics.json and the
    plots of the first `plots` patients there."""
    pred, ref = Path(pred), Path(ref)
    with ExitStack() as stack:
        preds = _open_predictions(pred, stack)
        refs = _open_references(ref, split, stack)
        if ref.is_file() and ref.suffix != ".npz":
            preds = _on_source_grid(preds, stack.enter_context(open_data(ref)))
        ids = _patient_ids(preds, refs, split)
        plot_dir = out / "plots" if out is not None else None
        scores = score_patients(_pairs(preds, refs, ids, plot_dir, plots))
    say(scores.report())
    if out is not None:
        save_json(out / "metrics.json", {"pred": str(pred), "ref": str(ref), "split": split,
                                         **scores.to_dict()})
        say(f"wrote {out / 'metrics.json'}")
    return scores


@dataclass
class Config:
    """`split`: score exactly the reference patients of this split (None: every predicted one);
    `plots`: DVH and dose-slice plots of the first `plots` patients."""

    split: str | None = None
    plots: int = 3

    def validate(self) -> None:
        if self.split is not None and self.split not in SPLITS:
            raise ConfigError(f"config key 'split': one of {', '.join(SPLITS)}, got {self.split!r}")
        at_least("plots", self.plots, 0)


@dataclass(frozen=True)
class Inputs:
    pred: Path  # a folder of submission CSVs or a predictions HDF5
    ref: Path  # an OpenKBP tree or a nasdose data set


def run(config: Config, inputs: Inputs, out: Path, resume: bool = False, *, force: bool = False) -> Scores:
    """Score into `out` (metrics.json, plots/). Nothing to resume: scoring is redone whole; earlier
    scores in `out` are replaced only with `force`."""
    with output_folder(out):
        refuse_existing([Path(out) / "metrics.json"], force)
        shutil.rmtree(Path(out) / "plots", ignore_errors=True)  # an earlier run's, of other patients perhaps
        return evaluate_predictions(inputs.pred, inputs.ref, Path(out), config.split, config.plots)

