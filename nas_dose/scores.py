"""The OpenKBP dose score and DVH score, computed exactly as the challenge's official evaluator.

Numbers from nasdose must be comparable with published OpenKBP results, so every convention is
the official one: numpy's default (linear) percentiles, D_0.1cc from n = max(1, round(100 mm³ /
voxel volume)) hottest voxels, the dose error summed over all voxels but divided by the size of
the possible-dose mask, NaN-skipping means, and a DVH score pooled over the whole patient ×
(metric, structure) table rather than averaged per patient.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from .data.patient import OARS, ROIS, TARGETS, Patient
from .data.store import DataFile
from .errors import input_error

OAR_METRICS: tuple[str, ...] = ("D_0.1_cc", "mean")
TARGET_METRICS: tuple[str, ...] = ("D_99", "D_95", "D_1")
METRICS: tuple[str, ...] = OAR_METRICS + TARGET_METRICS
# Percentile (numpy convention) of each target metric: D_99 is the dose 99% of the volume gets.
_TARGET_PERCENTILE: dict[str, float] = {"D_99": 1.0, "D_95": 5.0, "D_1": 99.0}


def metrics_for(roi: str) -> tuple[str, ...]:
    """The DVH metrics the challenge scores for one structure."""
    if roi in OARS:
        return OAR_METRICS
    if roi in TARGETS:
        return TARGET_METRICS
    raise ValueError(f"not an OpenKBP structure: {roi!r}")


def dose_error(pred: np.ndarray, ref: np.ndarray, possible_dose_mask: np.ndarray) -> float:
    """Sum of |ref - pred| over all voxels / number of mask voxels (NaN for an empty mask).

    Computed in float64, as the official evaluator does on doses read from CSV.
    """
    n = np.count_nonzero(possible_dose_mask)
    if n == 0:
        return math.nan
    diff = np.asarray(ref, dtype=np.float64) - np.asarray(pred, dtype=np.float64)
    return float(np.sum(np.abs(diff)) / n)


def dvh_metrics(dose: np.ndarray, structures: Mapping[str, np.ndarray],
                voxel_mm: Sequence[float]) -> dict[str, dict[str, float]]:
    """{roi: {metric: Gy}} for every contoured (non-empty) OpenKBP structure, in ROIS order.

    OARs get D_0.1_cc and mean, targets D_99, D_95 and D_1. Names outside ROIS are not scored.
    Where a structure is smaller than 0.1 cc (the official code would fail on a negative
    percentile) D_0.1_cc is its minimum dose: the hottest 0.1 cc then holds all of it.
    """
    voxels_in_tenth_cc = np.maximum(1, np.round(100 / np.prod(np.asarray(voxel_mm, np.float64))))
    dose = np.asarray(dose, dtype=np.float64)
    out: dict[str, dict[str, float]] = {}
    for roi in ROIS:
        mask = structures.get(roi)
        if mask is None or not np.any(mask):
            continue
        roi_dose = dose[np.asarray(mask, dtype=bool)]
        values: dict[str, float] = {}
        for metric in metrics_for(roi):
            if metric == "D_0.1_cc":
                q = 100 - voxels_in_tenth_cc / roi_dose.size * 100
                values[metric] = float(np.percentile(roi_dose, max(q, 0.0)))
            elif metric == "mean":
                values[metric] = float(roi_dose.mean())
            else:
                values[metric] = float(np.percentile(roi_dose, _TARGET_PERCENTILE[metric]))
        out[roi] = values
    return out


@dataclass(frozen=True)
class DVHRow:
    """One cell of the pooled DVH table: a metric of one structure of one patient."""

    patient: str
    roi: str
    metric: str
    reference: float
    predicted: float
    abs_error: float


def _nanmean(values: Iterable[float]) -> float:
    """Mean skipping NaN; NaN (without numpy's empty-slice warning) when nothing is left."""
    finite = [v for v in values if not math.isnan(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


@dataclass
class Scores:
    """The challenge's two scores, with the per-patient errors and the DVH table behind them."""

    dose_score: float
    dvh_score: float
    per_patient: dict[str, dict[str, float]]
    table: list[DVHRow] = field(default_factory=list)

    def per_structure(self) -> dict[str, dict[str, float]]:
        """{roi: {metric: mean absolute error over patients}} for the structures in the table."""
        errors: dict[str, dict[str, list[float]]] = {}
        for row in self.table:
            errors.setdefault(row.roi, {}).setdefault(row.metric, []).append(row.abs_error)
        return {roi: {m: _nanmean(errors[roi][m]) for m in metrics_for(roi) if m in errors[roi]}
                for roi in ROIS if roi in errors}

    def to_dict(self) -> dict[str, object]:
        """Plain Python values for JSON (NaN stays NaN)."""
        return {"dose_score": self.dose_score, "dvh_score": self.dvh_score,
                "n_patients": len(self.per_patient), "per_patient": self.per_patient,
                "per_structure": self.per_structure(), "table": [asdict(r) for r in self.table]}

    def report(self) -> str:
        """The scores and the per-structure error table as printable text."""
        lines = [f"dose score {self.dose_score:.4f} Gy   DVH score {self.dvh_score:.4f} Gy   "
                 f"({len(self.per_patient)} patients)",
                 f"{'structure':<14}" + "".join(f"{m:>10}" for m in METRICS)]
        for roi, errs in self.per_structure().items():
            cells = (f"{errs[m]:10.4f}" if m in errs else f"{'-':>10}" for m in METRICS)
            lines.append(f"{roi:<14}" + "".join(cells))
        return "\n".join(lines)


def score_patients(pairs: Iterable[tuple[Patient, np.ndarray]]) -> Scores:
    """Score predicted doses (Gy) against reference patients on the same grid.

    Each structure is scored only where the reference patient has it; the DVH metrics of the
    prediction use the reference patient's masks and voxel size, as the official evaluator does.
    """
    per_patient: dict[str, dict[str, float]] = {}
    table: list[DVHRow] = []
    for patient, pred in pairs:
        if patient.id in per_patient:
            raise input_error(patient.id, "patient scored twice")
        if patient.dose is None:
            raise input_error(patient.id, "reference patient has no dose")
        pred = np.asarray(pred)
        if pred.shape != patient.dose.shape:
            raise input_error(patient.id, f"predicted dose has shape {pred.shape}, reference "
                                          f"dose {patient.dose.shape}")
        masks = {"possible_dose_mask": patient.possible_dose_mask, **patient.structures}
        for name, mask in masks.items():
            if mask.shape != pred.shape:
                raise input_error(patient.id, f"{name} has shape {mask.shape}, dose {pred.shape}")
        ref_metrics = dvh_metrics(patient.dose, patient.structures, patient.voxel_mm)
        pred_metrics = dvh_metrics(pred, patient.structures, patient.voxel_mm)
        rows = [DVHRow(patient.id, roi, m, ref, pred_metrics[roi][m],
                       abs(ref - pred_metrics[roi][m]))
                for roi, values in ref_metrics.items() for m, ref in values.items()]
        table.extend(rows)
        per_patient[patient.id] = {
            "dose_error": dose_error(pred, patient.dose, patient.possible_dose_mask),
            "dvh_error": _nanmean(r.abs_error for r in rows)}
    if not per_patient:
        raise ValueError("score_patients: no patients to score")
    return Scores(dose_score=_nanmean(p["dose_error"] for p in per_patient.values()),
                  dvh_score=_nanmean(r.abs_error for r in table),
                  per_patient=per_patient, table=table)


def score_on_source(data: DataFile, doses: Iterable[tuple[str, np.ndarray]]) -> Scores:
    """The official scores of doses predicted on `data`'s grid: each upsampled to the patient's
    source grid (as `nasdose predict` writes it) and scored against the source dose and masks.
    This is the score to report; on a resampled data set a score on its own grid is a proxy."""
    return score_patients((data.read_source(pid), data.to_source_grid(pid, dose)) for pid, dose in doses)


def resampling_floor(data: DataFile, ids: Sequence[str]) -> Scores | None:
    """The official scores of a perfect prediction on `data`'s grid (its own reference dose,
    upsampled): no model trained on this grid can score better. None when not resampled."""
    planned = [pid for pid in ids if data.has_dose(pid)]
    if not planned or all(data.source_grid(pid) == data.grid for pid in planned):
        return None
    return score_on_source(data, ((pid, data.read_dose(pid)) for pid in planned))
