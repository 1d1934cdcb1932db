from pathlib import Path

import numpy as np
import pytest

from nas_dose.data.openkbp import (
    discover,
    natural_key,
    read_csv_patient,
    read_npz_patient,
    read_patient,
    read_sparse_csv,
    read_submission_csv,
    write_submission_csv,
)
from nas_dose.data.patient import ROIS
from nas_dose.errors import NasDoseError


def tiny_npz(path: Path, grid: int = 4, **changes: np.ndarray) -> Path:
    """A small patient in the npz layout; `changes` replace (or, as None, drop) arrays."""
    arrays = {"ct": np.arange(grid ** 3, dtype=np.int16).reshape((grid,) * 3) * 2,
              "dose": np.full((grid,) * 3, 60.0, np.float32),
              "possible_dose_mask": np.ones((grid,) * 3, bool),
              "PTV70": np.eye(grid, dtype=bool)[None].repeat(grid, 0),
              "voxel_dimensions_mm": np.array([3.906, 3.906, 2.5], np.float32)}
    arrays.update(changes)
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def tiny_csv_patient(folder: Path, ct_lines: str = "5,1024.0\n6,5000.0\n") -> Path:
    folder.mkdir(parents=True)
    (folder / "ct.csv").write_text(",data\n" + ct_lines)
    (folder / "possible_dose_mask.csv").write_text(",data\n5,\n")
    (folder / "PTV70.csv").write_text(",data\n5,\n")
    (folder / "Unknown.csv").write_text(",data\n7,\n")
    (folder / "voxel_dimensions.csv").write_text("3.0\n3.0\n2.5\n")
    return folder


@pytest.mark.openkbp
@pytest.mark.parametrize("pid", ["pt_1", "pt_5"])
def test_csv_and_npz_readers_agree(openkbp_dir, pid):
    a = read_csv_patient(openkbp_dir / "csv" / "train-pats" / pid)
    b = read_npz_patient(openkbp_dir / "npz128" / "train" / f"{pid}.npz")
    assert a.id == b.id == pid
    assert a.voxel_mm == b.voxel_mm
    for x, y, dtype in [(a.ct, b.ct, np.float32), (a.dose, b.dose, np.float32),
                        (a.possible_dose_mask, b.possible_dose_mask, bool)]:
        assert x.shape == (128, 128, 128) and x.dtype == y.dtype == dtype
        assert np.array_equal(x, y)
    assert sorted(a.structures) == sorted(b.structures)
    assert "PTV70" in a.structures and set(a.structures) <= set(ROIS)
    for name, mask in a.structures.items():
        assert mask.dtype == bool and np.array_equal(mask, b.structures[name])
    assert 0 <= a.ct.min() and a.ct.max() <= 4095
    # In this data the possible-dose mask is exactly where the reference dose is non-zero.
    assert np.array_equal(a.dose > 0, a.possible_dose_mask)
    assert a.attrs == {"source": str(openkbp_dir / "csv" / "train-pats" / pid), "split": "train"}


@pytest.mark.openkbp
def test_discover_openkbp_trees(openkbp_dir):
    found = discover(openkbp_dir / "csv")
    assert [(s.id, s.layout, s.split) for s in found] == [
        ("pt_1", "csv", "train"), ("pt_5", "csv", "train"), ("pt_201", "csv", "validation")]
    single = discover(openkbp_dir / "npz128" / "validation" / "pt_201.npz")
    assert [(s.id, s.layout, s.split) for s in single] == [("pt_201", "npz", "validation")]
    one_split = discover(openkbp_dir / "csv" / "validation-pats")
    assert [(s.id, s.layout, s.split) for s in one_split] == [("pt_201", "csv", "validation")]
    patient = read_patient(found[2])
    assert patient.id == "pt_201" and patient.attrs["split"] == "validation"


def test_discover_flat_folder_sorts_naturally(tmp_path):
    for name in ("pt_10", "pt_2", "pt_1"):
        tiny_npz(tmp_path / f"{name}.npz")
    tiny_csv_patient(tmp_path / "pt_3")
    (tmp_path / "notes.txt").write_text("ignored")
    found = discover(tmp_path)
    assert [(s.id, s.layout, s.split) for s in found] == [
        ("pt_1", "npz", "train"), ("pt_2", "npz", "train"), ("pt_3", "csv", "train"),
        ("pt_10", "npz", "train")]
    assert [s.id for s in discover(tmp_path / "pt_3")] == ["pt_3"]
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]


def test_discover_split_folders_of_npz(tmp_path):
    (tmp_path / "validation").mkdir()
    (tmp_path / "test").mkdir()
    tiny_npz(tmp_path / "validation" / "pt_201.npz")
    tiny_npz(tmp_path / "test" / "pt_300.npz")
    (tmp_path / "unlabeled").mkdir()
    tiny_npz(tmp_path / "unlabeled" / "pt_400.npz", dose=None)
    assert [(s.id, s.split) for s in discover(tmp_path)] == [("pt_201", "validation"), ("pt_300", "test"),
                                                             ("pt_400", "unlabeled")]
    (tmp_path / "test" / "pt_201.npz").write_bytes(b"")
    with pytest.raises(NasDoseError, match="patient pt_201 appears twice"):
        discover(tmp_path)


def test_discover_errors(tmp_path):
    with pytest.raises(NasDoseError, match=f"^{tmp_path}: no OpenKBP patients found"):
        discover(tmp_path)
    with pytest.raises(NasDoseError, match="missing: not found"):
        discover(tmp_path / "missing")


def test_sparse_csv_values_masks_and_defaults(tmp_path):
    values = tmp_path / "v.csv"
    values.write_text(",data\n0,1.5\n7,-2.25\n\n")
    assert read_sparse_csv(values, (2, 2, 2)).tolist() == [[[1.5, 0], [0, 0]], [[0, 0], [0, -2.25]]]
    mask = tmp_path / "m.csv"
    mask.write_text(",data\r\n3,\r\n4,1\r\n")
    got = read_sparse_csv(mask, (2, 2, 2), mask=True)
    assert got.dtype == bool and np.flatnonzero(got).tolist() == [3, 4]


@pytest.mark.parametrize("text, problem", [
    (",data\n1,2.0\n3,abc\n", "line 3: expected 'flat_index,value'"),
    (",data\n1.5,2.0\n", "line 2: expected 'flat_index,value'"),
    (",data\n8,1.0\n", "line 2: flat index 8 outside 0..7"),
    (",data\n-1,1.0\n", "line 2: flat index -1 outside 0..7"),
    (",data\n2,nan\n", "line 2: value nan is not finite"),
    ("1,2.0\n", "not an OpenKBP sparse CSV"),
    ("", "not an OpenKBP sparse CSV"),
])
def test_sparse_csv_bad_input_names_file_and_line(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(NasDoseError) as e:
        read_sparse_csv(path, (2, 2, 2))
    assert str(e.value).startswith(f"{path}: {problem}") and "\n" not in str(e.value)


@pytest.mark.openkbp
def test_submission_round_trip_is_exact(openkbp_dir, tmp_path):
    dose = read_sparse_csv(openkbp_dir / "csv" / "train-pats" / "pt_1" / "dose.csv")
    noisy = dose * np.float32(1.0 + 1e-7) + np.float32(1e-6) * (dose > 0)
    for name, array in [("ref.csv", dose), ("noisy.csv", noisy.astype(np.float32))]:
        write_submission_csv(tmp_path / name, array)
        back = read_submission_csv(tmp_path / name)
        assert back.dtype == np.float32 and np.array_equal(back, array)
    # The writer reproduces the challenge's own file for this patient, byte for byte.
    original = openkbp_dir / "csv" / "train-pats" / "pt_1" / "dose.csv"
    assert (tmp_path / "ref.csv").read_bytes() == original.read_bytes()


def test_submission_writer_rejects_bad_doses(tmp_path):
    dose = np.zeros((4, 4, 4), np.float32)
    dose[1, 2, 3] = np.nan
    with pytest.raises(NasDoseError, match="out.csv: the dose holds NaN"):
        write_submission_csv(tmp_path / "out.csv", dose)
    with pytest.raises(NasDoseError, match="out.csv: a dose must be a 3-D array"):
        write_submission_csv(tmp_path / "out.csv", np.zeros((4, 4)))
    assert list(tmp_path.iterdir()) == []


def test_csv_patient_small_folder(tmp_path):
    p = read_csv_patient(tiny_csv_patient(tmp_path / "pt_9"), split="test")
    assert p.id == "pt_9" and p.dose is None and p.voxel_mm == (3.0, 3.0, 2.5)
    assert list(p.structures) == ["PTV70"]  # Unknown.csv is not an OpenKBP structure
    assert p.ct.ravel()[5:7].tolist() == [1024.0, 4095.0]  # clipped to the stored CT range
    assert np.flatnonzero(p.possible_dose_mask).tolist() == [5]
    assert p.attrs["split"] == "test"


def test_csv_patient_errors(tmp_path):
    folder = tiny_csv_patient(tmp_path / "pt_1")
    (folder / "possible_dose_mask.csv").unlink()
    with pytest.raises(NasDoseError, match=f"^{folder}: missing possible_dose_mask.csv$"):
        read_csv_patient(folder)
    folder = tiny_csv_patient(tmp_path / "pt_2")
    (folder / "voxel_dimensions.csv").write_text("3\n3\n")
    with pytest.raises(NasDoseError, match="voxel_dimensions.csv: expected three positive voxel sizes"):
        read_csv_patient(folder)
    folder = tiny_csv_patient(tmp_path / "pt_3", ct_lines="5,10\n6,x\n")
    with pytest.raises(NasDoseError, match=r"pt_3/ct.csv: line 3"):
        read_csv_patient(folder)


def test_npz_patient_small(tmp_path):
    p = read_npz_patient(tiny_npz(tmp_path / "pt_7.npz", possible_dose_mask=np.ones((4, 4, 4), np.uint8)),
                         split="validation")
    assert p.id == "pt_7" and p.grid == 4 and p.ct.dtype == np.float32 and p.ct[0, 0, 3] == 6.0
    assert p.possible_dose_mask.dtype == bool and p.possible_dose_mask.all()
    assert list(p.structures) == ["PTV70"] and p.voxel_mm == (3.906, 3.906, 2.5)
    assert read_npz_patient(tiny_npz(tmp_path / "pt_8.npz", dose=None)).dose is None


@pytest.mark.parametrize("changes, problem", [
    ({"ct": np.full((4, 4, 4), np.nan, np.float32)}, "the CT holds NaN or infinite values"),
    ({"dose": np.full((4, 4, 4), np.inf, np.float32)}, "the dose holds NaN or infinite values"),
    ({"dose": np.zeros((4, 4, 3), np.float32)}, "array 'dose' has shape (4, 4, 3), expected (4, 4, 4)"),
    ({"ct": np.zeros((4, 4, 2), np.int16)}, "'ct' must be a cubic 3-D numeric array"),
    ({"PTV70": np.full((4, 4, 4), 2, np.int8)}, "array 'PTV70' is not a mask"),
    ({"ct": None}, "missing array 'ct'"),
    ({"voxel_dimensions_mm": np.array([1.0, 0.0, 2.0])}, "expected three positive voxel sizes"),
])
def test_npz_bad_input_names_file(tmp_path, changes, problem):
    path = tiny_npz(tmp_path / "pt_1.npz", **changes)
    with pytest.raises(NasDoseError) as e:
        read_npz_patient(path)
    assert str(e.value).startswith(f"{path}: {problem}") and "\n" not in str(e.value)


def test_truncated_npz(tmp_path):
    path = tiny_npz(tmp_path / "pt_1.npz", grid=16)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(NasDoseError, match=f"^{path}: not a readable npz archive"):
        read_npz_patient(path)
