import multiprocessing
import os
import pickle

import h5py
import numpy as np
import pytest

from nas_dose.data.patient import ROIS, Patient
from nas_dose.data.resample import downsample_patient
from nas_dose.data.store import open_data, write_dataset, write_predictions
from nas_dose.errors import NasDoseError

G = 8


def patient(pid: str, split: str = "train", seed: int = 0, dose: bool = True) -> Patient:
    rng = np.random.default_rng(seed)
    mask = rng.random((G,) * 3) < 0.6
    return Patient(
        id=pid,
        ct=rng.uniform(0, 4095, (G,) * 3).astype(np.float32),
        possible_dose_mask=mask,
        structures={"PTV70": mask & (rng.random((G,) * 3) < 0.5), "Larynx": rng.random((G,) * 3) < 0.1},
        voxel_mm=(3.906, 3.906, 2.5),
        dose=np.where(mask, rng.uniform(0, 75, (G,) * 3), 0).astype(np.float32) if dose else None,
        attrs={"split": split, "source": f"/data/{pid}.npz", "note": "kept"},
    )


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "d.h5"
    patients = [patient("pt_10", seed=1), patient("pt_2", "validation", seed=2),
                patient("pt_3", "test", seed=3, dose=False)]
    write_dataset(path, patients, source="unit", grid=G, total=3)
    return path, {p.id: p for p in patients}


def test_dataset_round_trip(dataset):
    path, patients = dataset
    with open_data(path) as data:
        assert (data.kind, data.grid, data.path) == ("dataset", G, path)
        assert {k: data.attrs[k] for k in ("nasdose_format", "format_version", "grid", "source")} == {
            "nasdose_format": "dataset", "format_version": 2, "grid": G, "source": "unit"}
        assert data.ids() == ["pt_10", "pt_2", "pt_3"] and len(data) == 3
        assert data.ids("validation") == ["pt_2"] and "pt_2" in data and "pt_4" not in data
        assert data.splits() == {"train": ["pt_10"], "validation": ["pt_2"], "test": ["pt_3"]}
        for pid, p in patients.items():
            q = data.read(pid)
            assert q.id == pid and q.voxel_mm == p.voxel_mm
            assert q.ct.dtype == np.float32 and np.array_equal(q.ct, p.ct)
            assert q.possible_dose_mask.dtype == bool
            assert np.array_equal(q.possible_dose_mask, p.possible_dose_mask)
            assert list(q.structures) == ["Larynx", "PTV70"]  # only the contoured, in ROIS order
            assert all(np.array_equal(q.structures[n], p.structures[n]) for n in p.structures)
            assert q.attrs == {"split": p.attrs["split"], "source": f"/data/{pid}.npz", "note": "kept",
                               "source_grid": G, "resample_factor": 1}
            assert np.array_equal(data.read_structure(pid, "PTV70"), p.structures["PTV70"])
            assert not data.read_structure(pid, "Brainstem").any()
        assert np.array_equal(data.read_dose("pt_2"), patients["pt_2"].dose)
        assert data.read("pt_3").dose is None and not data.has_dose("pt_3")
        assert data.patient_attrs("pt_2")["rois"] == ["Larynx", "PTV70"]
        assert data.patient_attrs("pt_2")["voxel_mm"] == [3.906, 3.906, 2.5]
        with pytest.raises(NasDoseError, match=f"^{path}: patient pt_3: no 'dose' array$"):
            data.read_dose("pt_3")
        with pytest.raises(NasDoseError, match=f"^{path}: no patient 'pt_9'$"):
            data.read("pt_9")
        with pytest.raises(NasDoseError, match="unknown split 'val'"):
            data.ids("val")


def test_hdf5_layout_follows_the_architecture_notes(dataset):
    path, _ = dataset
    with h5py.File(path) as f:
        g = f["patients/pt_10"]
        assert g["ct"].dtype == np.float32 and g["dose"].dtype == np.float32
        assert g["possible_dose_mask"].dtype == np.uint8 and g["structures"].dtype == np.uint8
        assert g["structures"].shape == (len(ROIS), G, G, G)
        assert g["structures"][ROIS.index("Brainstem")].max() == 0
        assert g["ct"].compression == "gzip" and g["ct"].shuffle and g["ct"].chunks == (G, G, G)
        assert g["structures"].chunks == (1, G, G, G)
        assert g.attrs["split"] == "train" and g.attrs["resample_factor"] == 1
        assert "source" not in g and "dose" not in f["patients/pt_3"]


def test_resampled_patient_keeps_its_source_arrays(tmp_path):
    p = patient("pt_1")
    q = downsample_patient(p, 2)
    write_dataset(tmp_path / "r.h5", [q], source="unit", grid=G // 2)
    with open_data(tmp_path / "r.h5") as data:
        back = data.read("pt_1")
        assert back.attrs["resample_factor"] == 2 and back.attrs["source_grid"] == G
        assert back.source is None  # read lazily: read_source
        source_mask = data.source_mask("pt_1")
        assert source_mask.dtype == bool and np.array_equal(source_mask, p.possible_dose_mask)
        assert np.array_equal(back.dose, q.dose) and back.voxel_mm == (7.812, 7.812, 5.0)
        full = data.read_source("pt_1")
        assert full.voxel_mm == p.voxel_mm and sorted(full.structures) == sorted(p.structures)
        for name in ("ct", "dose", "possible_dose_mask"):
            assert np.array_equal(getattr(full, name), getattr(p, name))
        box = (slice(2, 5), slice(0, G), slice(1, 2))
        part = data.read_source("pt_1", box)
        assert part.dose.shape == (3, G, 1) and np.array_equal(part.dose, p.dose[box])
        assert all(np.array_equal(part.structures[n], p.structures[n][box]) for n in p.structures)
    write_dataset(tmp_path / "s.h5", [p], source="unit", grid=G)
    with open_data(tmp_path / "s.h5") as data:
        assert np.array_equal(data.read_source("pt_1").dose, p.dose)


def _dose_sum_in_child(data, pid):
    """Read in a forked worker; report whether the worker opened its own handle."""
    inherited = data._file
    total = float(data.read_dose(pid).sum())
    return total, data._file is not inherited and data._pid == os.getpid()


def test_datafile_pickles_and_reopens_in_workers(dataset):
    path, patients = dataset
    data = open_data(path)
    expected = float(data.read_dose("pt_10").sum())  # the parent has the file open now
    clone = pickle.loads(pickle.dumps(data))
    assert clone._file is None and clone.ids() == data.ids()
    assert float(clone.read_dose("pt_10").sum()) == expected
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_dose_sum_in_child, (data, "pt_10")) == (expected, True)
    assert float(data.read_dose("pt_10").sum()) == expected
    data.close()
    clone.close()


def test_failed_write_leaves_no_file(tmp_path):
    def patients():
        yield patient("pt_1")
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError):
        write_dataset(tmp_path / "d.h5", patients(), source="unit", grid=G)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, problem", [
    (lambda p: setattr(p, "dose", p.dose[:-1]),
     "patient pt_1: 'dose' has shape (7, 8, 8), expected (8, 8, 8)"),
    (lambda p: p.structures.update(Cochlea=p.structures["PTV70"]),
     "patient pt_1: unknown structures ['Cochlea']"),
    (lambda p: p.attrs.update(split="val"),
     "patient pt_1: split 'val' is not one of train, validation, test, unlabeled"),
    (lambda p: setattr(p, "id", "a/b"), "patient id 'a/b' cannot name an HDF5 group"),
])
def test_bad_patient_is_an_input_error(tmp_path, bad, problem):
    p = patient("pt_1")
    bad(p)
    path = tmp_path / "d.h5"
    with pytest.raises(NasDoseError) as e:
        write_dataset(path, [patient("pt_0"), p], source="unit", grid=G)
    assert str(e.value) == f"{path}: {problem}"
    assert list(tmp_path.iterdir()) == []


def test_duplicate_and_no_patients(tmp_path):
    with pytest.raises(NasDoseError, match="d.h5: patient pt_1 appears twice"):
        write_dataset(tmp_path / "d.h5", [patient("pt_1"), patient("pt_1")], source="", grid=G)
    with pytest.raises(NasDoseError, match="d.h5: no patients to write"):
        write_dataset(tmp_path / "d.h5", [], source="", grid=G)
    assert list(tmp_path.iterdir()) == []


def test_open_errors_name_the_file(dataset, tmp_path):
    path, _ = dataset
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[:2000])
    text = tmp_path / "text.h5"
    text.write_text("hello")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=[1, 2])
    for bad, problem in [(truncated, "not a readable HDF5 file"), (text, "not a readable HDF5 file"),
                         (foreign, "not a nasdose file"), (tmp_path / "none.h5", "file not found")]:
        with pytest.raises(NasDoseError, match=f"^{bad}: {problem}"):
            open_data(bad)


def test_wrong_array_shape_names_file_and_patient(dataset):
    path, _ = dataset
    with h5py.File(path, "a") as f:
        del f["patients/pt_2/ct"]
        f["patients/pt_2"].create_dataset("ct", data=np.zeros((4, 4, 4), np.float32))
    with open_data(path) as data:
        data.read("pt_10")
        problem = r"'ct' has shape \(4, 4, 4\), expected \(8, 8, 8\)"
        with pytest.raises(NasDoseError, match=rf"^{path}: patient pt_2: {problem}$"):
            data.read("pt_2")


def test_predictions_round_trip(tmp_path):
    path = tmp_path / "p.h5"
    doses = {"pt_1": np.full((G,) * 3, 3.5, np.float32),
             "pt_7": np.arange(G ** 3, dtype=np.float64).reshape((G,) * 3)}
    attrs = {"voxel_mm": (1.0, 2.0, 3.0), "split": "test"}
    write_predictions(path, [(pid, d, attrs) for pid, d in doses.items()], grid=G, source="model m")
    with open_data(path) as data:
        assert (data.kind, data.grid, data.attrs["source"]) == ("predictions", G, "model m")
        assert data.ids() == ["pt_1", "pt_7"] and data.splits() == {"test": ["pt_1", "pt_7"]}
        for pid, d in doses.items():
            got = data.read_dose(pid)
            assert got.dtype == np.float32 and np.array_equal(got, d)
        assert data.patient_attrs("pt_7") == {"voxel_mm": [1.0, 2.0, 3.0], "split": "test"}
        with pytest.raises(NasDoseError, match="p.h5: a prediction file holds doses only"):
            data.read("pt_1")
    with pytest.raises(NasDoseError, match=r"q.h5: patient pt_1: dose has shape \(8, 8\), expected"):
        write_predictions(tmp_path / "q.h5", [("pt_1", np.zeros((G, G)), {})], grid=G)
    assert not (tmp_path / "q.h5").exists()
