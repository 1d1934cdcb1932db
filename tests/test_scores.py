"""OpenKBP scores: hand-computed cases, and agreement with an independent replica of the official
evaluator (pandas DataFrames and flattened arrays, as the challenge's own code) on hand-made and
real patients."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nas_dose.data.openkbp import discover, read_patient, read_submission_csv, write_submission_csv
from nas_dose.data.patient import OARS, ROIS, TARGETS, Patient
from nas_dose.errors import NasDoseError
from nas_dose.scores import Scores, dose_error, dvh_metrics, score_patients

TOLERANCE_GY = 1e-4


# ---------------------------------------------------------------------------------------------
# Replica of the official evaluator's flow (ababier/open-kbp, provided_code), rewritten here so
# that nas_dose.scores is checked against something that shares none of its code.

OFFICIAL_ROIS = {"oars": list(OARS), "targets": list(TARGETS)}
OFFICIAL_FULL_ROI_LIST = OFFICIAL_ROIS["oars"] + OFFICIAL_ROIS["targets"]


def official_load_csv_patient(folder: Path) -> dict:
    """A reference 'batch' as the official data loader builds it: float64 arrays, masks stacked
    on a last axis in the full ROI order, voxel dimensions from np.loadtxt."""
    shape = (128, 128, 128)
    batch = {"dose": np.zeros(shape), "possible_dose_mask": np.zeros(shape),
             "structure_masks": np.zeros(shape + (len(OFFICIAL_FULL_ROI_LIST),)),
             "voxel_dimensions": np.loadtxt(folder / "voxel_dimensions.csv")}
    for file in folder.iterdir():
        name = file.stem
        if name not in ("dose", "possible_dose_mask") and name not in OFFICIAL_FULL_ROI_LIST:
            continue
        frame = pd.read_csv(file, index_col=0)
        if frame.isnull().values.any():  # a mask: the indices of its voxels
            indices = np.array(frame.index).squeeze()
            if name == "possible_dose_mask":
                np.put(batch[name], indices, 1)
            else:
                roi_index = OFFICIAL_FULL_ROI_LIST.index(name)
                np.put(batch["structure_masks"],
                       len(OFFICIAL_FULL_ROI_LIST) * indices + roi_index, 1)
        else:
            np.put(batch[name], np.array(frame.index).squeeze(), np.array(frame["data"]).squeeze())
    return batch


def official_load_prediction(csv: Path) -> np.ndarray:
    dose = np.zeros((128, 128, 128))
    frame = pd.read_csv(csv, index_col=0)
    np.put(dose, np.array(frame.index).squeeze(), np.array(frame["data"]).squeeze())
    return dose


def batch_from_arrays(dose: np.ndarray, masks: dict[str, np.ndarray], voxel: tuple,
                      possible_dose_mask: np.ndarray) -> dict:
    stacked = np.zeros(dose.shape + (len(OFFICIAL_FULL_ROI_LIST),))
    for name, mask in masks.items():
        stacked[..., OFFICIAL_FULL_ROI_LIST.index(name)] = mask
    return {"dose": dose.astype(np.float64), "possible_dose_mask": possible_dose_mask.astype(float),
            "structure_masks": stacked, "voxel_dimensions": np.array(voxel, dtype=float)}


def official_evaluate(batches: dict[str, dict], predictions: dict[str, np.ndarray]):
    """The official evaluate() + get_scores(): returns dose score, DVH score and both metric
    DataFrames."""
    all_dvh_metrics = {oar: ["D_0.1_cc", "mean"] for oar in OFFICIAL_ROIS["oars"]} | \
                      {target: ["D_99", "D_95", "D_1"] for target in OFFICIAL_ROIS["targets"]}
    metric_columns = [(m, roi) for roi, metrics in all_dvh_metrics.items() for m in metrics]
    patient_ids = list(batches)
    dose_errors = pd.Series(index=patient_ids, data=None, dtype=float)
    differences_df = pd.DataFrame(index=patient_ids, columns=metric_columns)
    reference_df = differences_df.copy()
    prediction_df = differences_df.copy()

    def calculate(metric_df, dose, batch, patient_id):
        voxels_within_tenths_cc = np.maximum(1, np.round(100 / np.prod(batch["voxel_dimensions"])))
        for roi_index, roi in enumerate(OFFICIAL_FULL_ROI_LIST):
            flat_mask = batch["structure_masks"][..., roi_index].astype(bool).flatten()
            if not any(flat_mask):
                continue
            roi_dose = dose[flat_mask]
            for metric in all_dvh_metrics[roi]:
                if metric == "D_0.1_cc":
                    roi_size = len(roi_dose)
                    fractional_volume_to_evaluate = 100 - voxels_within_tenths_cc / roi_size * 100
                    value = np.percentile(roi_dose, fractional_volume_to_evaluate)
                elif metric == "mean":
                    value = roi_dose.mean()
                elif metric == "D_99":
                    value = np.percentile(roi_dose, 1)
                elif metric == "D_95":
                    value = np.percentile(roi_dose, 5)
                else:
                    value = np.percentile(roi_dose, 99)
                metric_df.at[patient_id, (metric, roi)] = value
        return metric_df

    for patient_id, batch in batches.items():
        reference_dose = batch["dose"].flatten()
        reference_df = calculate(reference_df, reference_dose, batch, patient_id)
        predicted_dose = predictions[patient_id].flatten()
        dose_errors[patient_id] = (np.sum(np.abs(reference_dose - predicted_dose))
                                   / np.sum(batch["possible_dose_mask"]))
        prediction_df = calculate(prediction_df, predicted_dose, batch, patient_id)
    dose_score = np.nanmean(dose_errors)
    dvh_score = np.nanmean(np.abs(reference_df - prediction_df).values)
    return dose_score, dvh_score, reference_df, prediction_df


def assert_agrees(scores: Scores, official) -> float:
    """Scores and every table cell agree with the replica; returns the largest difference."""
    dose_score, dvh_score, reference_df, prediction_df = official
    diffs = [abs(scores.dose_score - dose_score), abs(scores.dvh_score - dvh_score)]
    cells = {(r.patient, r.metric, r.roi): r for r in scores.table}
    official_cells = {(pid, m, roi) for pid in reference_df.index
                      for (m, roi) in reference_df.columns
                      if not pd.isna(reference_df.at[pid, (m, roi)])}
    assert set(cells) == official_cells
    for (pid, m, roi), row in cells.items():
        diffs.append(abs(row.reference - reference_df.at[pid, (m, roi)]))
        diffs.append(abs(row.predicted - prediction_df.at[pid, (m, roi)]))
    worst = max(diffs)
    assert worst < TOLERANCE_GY, worst
    return worst


# ---------------------------------------------------------------------------------------------
# Hand-made patients

def blob(shape: tuple[int, int, int], rng: np.random.Generator, min_voxels: int) -> np.ndarray:
    """A random ellipsoid holding at least `min_voxels` voxels."""
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    while True:
        centre = rng.uniform(3, np.array(shape) - 3)
        radii = rng.uniform(2.0, 6.0, size=3)
        mask = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
        if mask.sum() >= min_voxels:
            return mask


def hand_made_patient(pid: str, voxel: tuple[float, float, float], rng: np.random.Generator,
                      missing: tuple[str, ...] = (), empty: tuple[str, ...] = ()) -> Patient:
    shape = (20, 22, 18)
    n_tenth_cc = max(1, round(100 / math.prod(voxel)))
    structures = {roi: blob(shape, rng, n_tenth_cc + 5) for roi in ROIS if roi not in missing}
    structures.update({roi: np.zeros(shape, bool) for roi in empty})
    possible = np.zeros(shape, bool)
    possible[1:-1, 2:-2, 1:-1] = True
    dose = np.where(possible, rng.gamma(2.0, 12.0, shape), 0).astype(np.float32)
    dose[structures["PTV70"]] = rng.normal(70, 2, structures["PTV70"].sum())
    dose[5:8, 5:8, 5:8] = np.round(dose[5:8, 5:8, 5:8])  # ties in the percentiles
    return Patient(id=pid, ct=np.zeros(shape, np.float32), possible_dose_mask=possible,
                   structures=structures, voxel_mm=voxel, dose=dose)


# Voxels in 0.1 cc: 3, 12, 100, 1, 1 (rounds to 0), 2 (2.5 rounds half to even), 125.
VOXELS = [(3.906, 3.906, 2.5), (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), (5.422, 5.422, 3.0),
          (10.0, 10.0, 3.0), (4.0, 4.0, 2.5), (1.0, 1.0, 0.8)]


def test_agrees_with_official_evaluator_on_hand_made_patients() -> None:
    rng = np.random.default_rng(0)
    patients = [hand_made_patient(f"pt_{i}", voxel, rng,
                                  missing=("Esophagus", "PTV63") if i % 2 else ("Larynx",),
                                  empty=("Mandible",) if i == 3 else ())
                for i, voxel in enumerate(VOXELS)]
    predictions = {}
    for i, p in enumerate(patients):
        kinds = [p.dose * rng.uniform(0.8, 1.2, p.dose.shape),  # noisy, also outside the mask
                 rng.uniform(0, 80, p.dose.shape),  # unrelated
                 np.roll(p.dose, 2, axis=2) + 1.5]  # shifted and offset
        predictions[p.id] = kinds[i % 3].astype(np.float32)
    scores = score_patients((p, predictions[p.id]) for p in patients)
    official = official_evaluate(
        {p.id: batch_from_arrays(p.dose, p.structures, p.voxel_mm, p.possible_dose_mask)
         for p in patients},
        {pid: pred.astype(np.float64) for pid, pred in predictions.items()})
    assert_agrees(scores, official)
    scored_pt_3 = {r.roi for r in scores.table if r.patient == "pt_3"}
    assert scored_pt_3 == set(ROIS) - {"Mandible", "Esophagus", "PTV63"}  # Mandible is empty
    assert not any(r.roi == "Larynx" for r in scores.table if r.patient == "pt_0")


@pytest.mark.openkbp
def test_agrees_with_official_evaluator_on_real_patients(openkbp_dir: Path, tmp_path: Path) -> None:
    """Reference CSVs read by nasdose and by the official loader; perturbed predictions written
    as submission CSVs and read back by both."""
    rng = np.random.default_rng(1)
    sources = discover(openkbp_dir / "csv")
    assert [s.id for s in sources] == ["pt_1", "pt_5", "pt_201"]
    patients = [read_patient(s) for s in sources]
    for i, p in enumerate(patients):
        perturbed = [p.dose * rng.normal(1.0, 0.05, p.dose.shape),
                     np.roll(p.dose, 3, axis=2) * 0.97,
                     np.where(p.possible_dose_mask, p.dose + rng.normal(0, 2, p.dose.shape), 0)]
        write_submission_csv(tmp_path / f"{p.id}.csv", np.clip(perturbed[i], 0, None))
    predictions = {p.id: read_submission_csv(tmp_path / f"{p.id}.csv") for p in patients}
    scores = score_patients((p, predictions[p.id]) for p in patients)
    official = official_evaluate({s.id: official_load_csv_patient(s.path) for s in sources},
                                 {p.id: official_load_prediction(tmp_path / f"{p.id}.csv")
                                  for p in patients})
    assert_agrees(scores, official)
    assert 0.5 < scores.dose_score < 10 and 0.1 < scores.dvh_score < 10


# ---------------------------------------------------------------------------------------------
# Hand-computed values

def ten_voxel_structure() -> tuple[np.ndarray, np.ndarray]:
    dose = np.zeros((4, 4, 4), np.float32)
    mask = np.zeros((4, 4, 4), bool)
    mask.reshape(-1)[:10] = True
    dose.reshape(-1)[:10] = np.arange(10, 0, -1)  # 10 voxels with 10, 9, ..., 1 Gy
    return dose, mask


@pytest.mark.parametrize("voxel, d01", [((5.0, 5.0, 4.0), 9.1),  # 100 mm³: n = 1 → 90th pct
                                        ((5.0, 5.0, 2.0), 8.2),  # 50 mm³: n = 2 → 80th pct
                                        ((1.0, 1.0, 1.0), 1.0)])  # n = 100 > 10: the minimum
def test_dvh_metrics_hand_computed(voxel: tuple[float, float, float], d01: float) -> None:
    dose, mask = ten_voxel_structure()
    metrics = dvh_metrics(dose, {"Brainstem": mask, "PTV70": mask, "Larynx": np.zeros_like(mask)},
                          voxel)
    assert list(metrics) == ["Brainstem", "PTV70"]
    assert metrics["Brainstem"] == pytest.approx({"D_0.1_cc": d01, "mean": 5.5}, abs=1e-12)
    assert metrics["PTV70"] == pytest.approx({"D_99": 1.09, "D_95": 1.45, "D_1": 9.91}, abs=1e-12)


def test_dose_error_hand_computed() -> None:
    ref = np.full((4, 4, 4), 2.0, np.float32)
    mask = np.zeros((4, 4, 4), bool)
    mask[:, :, 0] = True  # 16 voxels
    assert dose_error(ref + 1, ref, mask) == pytest.approx(64 / 16)  # all 64 voxels count
    assert math.isnan(dose_error(ref + 1, ref, np.zeros_like(mask)))


def make_patient(pid: str, rois: tuple[str, ...], mask_voxels: int = 16) -> Patient:
    dose, mask = ten_voxel_structure()
    possible = np.zeros_like(mask)
    possible.reshape(-1)[:mask_voxels] = True
    return Patient(id=pid, ct=np.zeros_like(dose), possible_dose_mask=possible,
                   structures={roi: mask for roi in rois}, voxel_mm=(5.0, 5.0, 4.0), dose=dose)


def test_dvh_score_is_pooled_and_dose_score_skips_nan() -> None:
    a = make_patient("pt_a", ("Brainstem",))  # 2 metrics, each off by 1 Gy
    b = make_patient("pt_b", ("SpinalCord", "PTV70"))  # 5 metrics, each off by 4 Gy
    c = make_patient("pt_c", ("Brainstem",), mask_voxels=0)  # empty mask: NaN dose error
    mask = a.structures["Brainstem"]
    scores = score_patients([(a, a.dose + mask), (b, b.dose + 4 * mask), (c, c.dose)])
    assert scores.dvh_score == pytest.approx((2 * 1 + 5 * 4 + 2 * 0) / 9, abs=1e-9)
    assert scores.per_patient["pt_a"] == pytest.approx({"dose_error": 10 / 16, "dvh_error": 1.0})
    assert scores.per_patient["pt_b"]["dvh_error"] == pytest.approx(4.0)
    assert math.isnan(scores.per_patient["pt_c"]["dose_error"])
    assert scores.dose_score == pytest.approx((10 / 16 + 40 / 16) / 2)
    assert len(scores.table) == 9
    row = next(r for r in scores.table
               if (r.patient, r.roi, r.metric) == ("pt_a", "Brainstem", "mean"))
    assert (row.reference, row.predicted, row.abs_error) == pytest.approx((5.5, 6.5, 1.0))

    per_structure = scores.per_structure()
    assert list(per_structure) == ["Brainstem", "SpinalCord", "PTV70"]
    assert per_structure["Brainstem"] == pytest.approx({"D_0.1_cc": 0.5, "mean": 0.5})
    assert per_structure["PTV70"] == pytest.approx({"D_99": 4.0, "D_95": 4.0, "D_1": 4.0})

    data = json.loads(json.dumps(scores.to_dict()))
    assert data["n_patients"] == 3 and data["dvh_score"] == pytest.approx(scores.dvh_score)
    assert math.isnan(data["per_patient"]["pt_c"]["dose_error"])
    assert len(data["table"]) == 9 and data["table"][0]["patient"] == "pt_a"
    assert "Brainstem" in scores.report() and "0.5000" in scores.report()


def test_score_patients_rejects_bad_input() -> None:
    a = make_patient("pt_7", ("Brainstem",))
    with pytest.raises(NasDoseError, match=r"^pt_7: predicted dose has shape \(4, 4, 3\)"):
        score_patients([(a, a.dose[:, :, :3])])
    a.structures["PTV70"] = np.zeros((4, 4, 3), bool)
    with pytest.raises(NasDoseError, match=r"^pt_7: PTV70 has shape"):
        score_patients([(a, a.dose)])
    b = make_patient("pt_8", ("Brainstem",))
    with pytest.raises(NasDoseError, match="^pt_8: patient scored twice"):
        score_patients([(b, b.dose), (b, b.dose)])
    b.dose = None
    with pytest.raises(NasDoseError, match="^pt_8: reference patient has no dose"):
        score_patients([(b, np.zeros((4, 4, 4)))])


@pytest.mark.openkbp
def test_source_grid_scores_of_a_32_import_agree_with_the_official_evaluator(openkbp_dir, tmp_path):
    """A dose predicted on a 32³ import (here the import's own reference, the resampling floor)
    is scored on the 128³ source grid exactly as the challenge scores its submission CSV."""
    from nas_dose.cli import main
    from nas_dose.data.openkbp import write_submission_csv
    from nas_dose.data.store import open_data
    from nas_dose.scores import resampling_floor

    data_path = tmp_path / "kbp32.h5"
    assert main(["data", "import", str(openkbp_dir / "csv"), str(data_path), "--grid", "32", "-q"]) == 0
    folders = {p.name: p for split in ("train-pats", "validation-pats")
               for p in (openkbp_dir / "csv" / split).iterdir()}
    with open_data(data_path) as data:
        ids = data.ids()
        floor = resampling_floor(data, ids)
        for pid in ids:
            write_submission_csv(tmp_path / f"{pid}.csv", data.to_source_grid(pid, data.read_dose(pid)))
    official = official_evaluate({pid: official_load_csv_patient(folders[pid]) for pid in ids},
                                 {pid: official_load_prediction(tmp_path / f"{pid}.csv") for pid in ids})
    assert assert_agrees(floor, official) < 1e-3
    assert floor.dose_score > 1.0  # the 32³ grid loses real accuracy: the floor is far from zero
