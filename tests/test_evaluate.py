"""`nasdose evaluate`: metrics.json equals score_patients' numbers, plots are valid PNGs, and bad
input stops with one line naming the file."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import nas_dose.cli
from nas_dose.data.openkbp import discover, read_patient, read_submission_csv, write_submission_csv
from nas_dose.data.patient import Patient
from nas_dose.data.store import write_dataset, write_predictions
from nas_dose.evaluate import evaluate_predictions
from nas_dose.plots import axial_centre, crop_box, cumulative_dvh, plot_dose_slices
from nas_dose.scores import Scores, score_patients

GRID = 16
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """Run `nasdose evaluate -q ARGS`; returns the exit status and stderr."""
    rc = nas_dose.cli.main(["evaluate", "-q", *map(str, args)])
    return rc, capsys.readouterr().err


def distance(centre: tuple[int, int, int]) -> np.ndarray:
    """Distance of every voxel from `centre`, in voxels."""
    grid = np.indices((GRID,) * 3).transpose(1, 2, 3, 0)
    return np.sqrt(((grid - np.array(centre)) ** 2).sum(-1))


def sphere(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    return distance(centre) <= radius


def phantom(pid: str, split: str, rng: np.random.Generator) -> Patient:
    """A small patient: body, PTV70 inside a PTV56 shell, two OARs, a dose falling off from the
    target."""
    body = sphere((8, 8, 8), 7)
    ptv70 = sphere((8, 7, 8), 3)
    dose = np.where(body, 72 * np.exp(-np.maximum(distance((8, 7, 8)) - 3, 0) / 4), 0)
    dose = (dose * rng.uniform(0.97, 1.03, body.shape)).astype(np.float32)
    ct = np.where(body, 1024 + rng.normal(40, 30, body.shape), 0).astype(np.float32)
    structures = {"PTV70": ptv70, "PTV56": sphere((8, 7, 8), 4) & ~ptv70,
                  "SpinalCord": sphere((12, 8, 8), 1.5), "Brainstem": sphere((11, 8, 3), 2)}
    return Patient(id=pid, ct=ct, possible_dose_mask=body, structures=structures,
                   voxel_mm=(4.0, 4.0, 2.5), dose=dose, attrs={"split": split})


@pytest.fixture
def hdf5_pair(tmp_path: Path) -> tuple[Path, Path, list[Patient], dict[str, np.ndarray]]:
    """A data set of four patients (train, train, validation, test) and predictions for all."""
    rng = np.random.default_rng(3)
    patients = [phantom(f"pt_{i}", split, rng)
                for i, split in enumerate(["train", "train", "validation", "test"], start=1)]
    preds = {p.id: (p.dose * rng.uniform(0.85, 1.1) + rng.normal(0, 1, p.dose.shape))
             .astype(np.float32) for p in patients}
    write_dataset(tmp_path / "data.h5", patients, source="test", grid=GRID)
    write_predictions(tmp_path / "pred.h5", [(pid, d, {}) for pid, d in preds.items()], grid=GRID)
    return tmp_path / "data.h5", tmp_path / "pred.h5", patients, preds


def assert_metrics_equal(metrics: dict, scores: Scores) -> None:
    """The same numbers, to the last bit (JSON round-trips floats exactly)."""
    expected = json.loads(json.dumps(scores.to_dict()))
    for key in ("dose_score", "dvh_score", "n_patients", "per_patient", "per_structure", "table"):
        assert metrics[key] == expected[key], key


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0.05


def test_hdf5_data_set_and_predictions(hdf5_pair, tmp_path: Path, capsys) -> None:
    data, pred, patients, preds = hdf5_pair
    out = tmp_path / "eval"
    assert run(capsys, "--pred", pred, "--ref", data, "--out", out) == (0, "")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pred"] == str(pred) and metrics["ref"] == str(data) and metrics["split"] is None
    assert list(metrics["per_patient"]) == ["pt_1", "pt_2", "pt_3", "pt_4"]
    expected = score_patients((p, preds[p.id]) for p in patients)
    assert_metrics_equal(metrics, expected)
    assert list(metrics["per_structure"]) == ["Brainstem", "SpinalCord", "PTV56", "PTV70"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        f"{kind}_pt_{i}.png" for kind in ("dvh", "slices") for i in (1, 2, 3)]
    for png in (out / "plots").iterdir():
        assert_png(png)


def test_split_and_plot_count(hdf5_pair, tmp_path: Path, capsys) -> None:
    data, pred, patients, preds = hdf5_pair
    out = tmp_path / "eval"
    assert run(capsys, "--pred", pred, "--ref", data, "--out", out, "--split", "train",
               "--plots", "1")[0] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "train" and list(metrics["per_patient"]) == ["pt_1", "pt_2"]
    assert_metrics_equal(metrics, score_patients((p, preds[p.id]) for p in patients[:2]))
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["dvh_pt_1.png", "slices_pt_1.png"]


def test_evaluate_predictions_without_output(hdf5_pair, tmp_path: Path) -> None:
    data, pred, patients, preds = hdf5_pair
    scores = evaluate_predictions(pred, data, None, split="validation")
    expected = score_patients([(patients[2], preds["pt_3"])])
    assert (scores.dose_score, scores.dvh_score) == (expected.dose_score, expected.dvh_score)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5", "pred.h5"]


@pytest.mark.openkbp
def test_real_patients_with_csv_submission(openkbp_dir: Path, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(4)
    patients = [read_patient(s) for s in discover(openkbp_dir / "csv")]
    for p in patients:
        pred = np.clip(p.dose + rng.normal(0, 1.5, p.dose.shape) * p.possible_dose_mask, 0, None)
        write_submission_csv(tmp_path / "sub" / f"{p.id}.csv", pred)
    out = tmp_path / "eval"
    assert run(capsys, "--pred", tmp_path / "sub", "--ref", openkbp_dir / "csv", "--out", out,
               "--plots", "2")[0] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["per_patient"]) == ["pt_1", "pt_5", "pt_201"]
    expected = score_patients((p, read_submission_csv(tmp_path / "sub" / f"{p.id}.csv"))
                              for p in patients)
    assert_metrics_equal(metrics, expected)
    assert 0.3 < metrics["dose_score"] < 3 and len(metrics["per_structure"]) == 10
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "dvh_pt_1.png", "dvh_pt_5.png", "slices_pt_1.png", "slices_pt_5.png"]
    for png in (out / "plots").iterdir():
        assert_png(png)

    # Only the validation patient, whose prediction is there among the others; the earlier
    # scores and plots replaced.
    assert run(capsys, "--pred", tmp_path / "sub", "--ref", openkbp_dir / "csv", "--out", out,
               "--split", "validation", "--plots", "0", "--force")[0] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["per_patient"]) == ["pt_201"] and not (out / "plots").exists()
    assert metrics["per_patient"]["pt_201"] == expected.per_patient["pt_201"]


def assert_one_line_error(rc_err: tuple[int, str], *names: object) -> None:
    rc, err = rc_err
    assert rc == 1
    assert err.startswith("nasdose evaluate: error: ") and err.count("\n") == 1
    for name in names:
        assert str(name) in err


def test_errors_name_the_file(hdf5_pair, tmp_path: Path, capsys) -> None:
    data, pred, patients, preds = hdf5_pair
    out = tmp_path / "eval"

    assert_one_line_error(run(capsys, "--pred", tmp_path / "nope.h5", "--ref", data, "--out", out),
                          tmp_path / "nope.h5", "not found")
    assert_one_line_error(run(capsys, "--pred", pred, "--ref", tmp_path / "nope", "--out", out),
                          tmp_path / "nope", "not found")
    assert_one_line_error(run(capsys, "--pred", data, "--ref", data, "--out", out),
                          data, "expected predictions")

    partial = tmp_path / "partial.h5"
    write_predictions(partial, [(pid, preds[pid], {}) for pid in ("pt_1", "pt_3")], grid=GRID)
    assert_one_line_error(run(capsys, "--pred", partial, "--ref", data, "--out", out,
                              "--split", "train"),
                          partial, "no prediction for train patient(s) pt_2")

    extra = tmp_path / "extra.h5"
    write_predictions(extra, [("pt_1", preds["pt_1"], {}), ("pt_9", preds["pt_1"], {})], grid=GRID)
    assert_one_line_error(run(capsys, "--pred", extra, "--ref", data, "--out", out),
                          data, "no reference patient pt_9", extra)

    coarse = tmp_path / "coarse.h5"
    write_predictions(coarse, [("pt_1", np.zeros((8, 8, 8), np.float32), {})], grid=8)
    assert_one_line_error(run(capsys, "--pred", coarse, "--ref", data, "--out", out),
                          coarse, data, "patient pt_1", "grid")

    folder = tmp_path / "empty"
    folder.mkdir()
    assert_one_line_error(run(capsys, "--pred", folder, "--ref", data, "--out", out),
                          folder, "no submission CSVs")
    assert not out.exists()


@pytest.mark.openkbp
def test_csv_submission_on_a_coarser_data_set_is_a_grid_mismatch(hdf5_pair, openkbp_dir: Path,
                                                                  tmp_path: Path, capsys) -> None:
    data = hdf5_pair[0]
    real = read_patient(discover(openkbp_dir / "csv")[0])
    write_submission_csv(tmp_path / "sub" / "pt_1.csv", real.dose)
    assert_one_line_error(run(capsys, "--pred", tmp_path / "sub", "--ref", data,
                              "--out", tmp_path / "eval"),
                          tmp_path / "sub" / "pt_1.csv", data, "grid")


def test_plot_helpers(tmp_path: Path) -> None:
    dose = np.zeros((GRID,) * 3, np.float32)
    mask = np.zeros_like(dose, dtype=bool)
    mask[2, 3, 5:15] = True
    dose[mask] = np.arange(1, 11)
    bins = np.array([0.0, 1.0, 5.5, 10.0, 11.0])
    assert cumulative_dvh(dose, mask, bins).tolist() == [100.0, 100.0, 50.0, 10.0, 0.0]
    assert axial_centre(mask) == 10 and axial_centre(np.zeros_like(mask)) is None
    assert crop_box(mask, margin=1) == (slice(1, 4), slice(2, 5))
    with pytest.raises(ValueError, match="slice 16 outside 0..15"):
        plot_dose_slices(dose, dose, dose, tmp_path / "s.png", slice_index=16)
    plot_dose_slices(dose, dose, dose * 0.5, tmp_path / "s.png")  # through the hottest voxels
    assert_png(tmp_path / "s.png")
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]  # no temporary file left
