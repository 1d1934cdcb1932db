import shutil

import h5py
import numpy as np
import pytest

from nas_dose import cli
from nas_dose.data.openkbp import read_csv_patient, read_npz_patient
from nas_dose.data.resample import downsample_patient
from nas_dose.data.store import open_data, write_predictions
from nas_dose.progress import set_quiet


def run_nasdose(*argv: object) -> int:
    """`nasdose data ARGV` in-process; --quiet is reset so later tests see progress as usual."""
    try:
        return cli.main(["data", *map(str, argv)])
    finally:
        set_quiet(False)


@pytest.fixture
def nasdose(capsys):
    """Run the CLI; returns (exit status, stdout, stderr)."""

    def run(*argv: object) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what the test's own setup printed
        status = run_nasdose(*argv)
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture(scope="module")
def csv_import32(openkbp_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("import") / "openkbp32.h5"
    assert run_nasdose("import", openkbp_dir / "csv", path, "--grid", "32", "-q") == 0
    return path


@pytest.mark.openkbp
def test_import_csv_tree_at_grid_32(openkbp_dir, csv_import32):
    with open_data(csv_import32) as data:
        assert data.kind == "dataset" and data.grid == 32
        assert data.attrs["source"] == f"openkbp:{openkbp_dir / 'csv'}"
        assert data.splits() == {"train": ["pt_1", "pt_5"], "validation": ["pt_201"]}
        source = read_csv_patient(openkbp_dir / "csv" / "train-pats" / "pt_1")
        expected = downsample_patient(source, 4)
        got = data.read("pt_1")
        assert got.voxel_mm == (15.624, 15.624, 10.0)
        assert got.attrs["resample_factor"] == 4 and got.attrs["source_grid"] == 128
        assert got.attrs["source"] == str(openkbp_dir / "csv" / "train-pats" / "pt_1")
        full = data.read_source("pt_1")
        assert full.voxel_mm == source.voxel_mm and sorted(full.structures) == sorted(source.structures)
        for a, b in [(full.ct, source.ct), (full.dose, source.dose),
                     (full.possible_dose_mask, source.possible_dose_mask),
                     (full.structures["PTV70"], source.structures["PTV70"])]:
            assert np.array_equal(a, b)
        box = (slice(60, 70), slice(0, 128), slice(5, 7))
        assert np.array_equal(data.read_source("pt_1", box).dose, source.dose[box])
        for a, b in [(got.ct, expected.ct), (got.dose, expected.dose),
                     (got.possible_dose_mask, expected.possible_dose_mask)]:
            assert np.array_equal(a, b)
        assert sorted(got.structures) == sorted(source.structures)
        for pid in data.ids():
            p = data.read(pid)
            assert p.structures["PTV70"].any() and not (p.dose > 0)[~p.possible_dose_mask].any()


@pytest.mark.openkbp
def test_import_npz_folder(openkbp_dir, tmp_path, nasdose):
    src = tmp_path / "npz"
    src.mkdir()
    for pid in ("pt_10", "pt_2", "pt_3"):
        shutil.copy(openkbp_dir / "npz128" / "train" / f"{pid}.npz", src)
    out = tmp_path / "out" / "d64.h5"
    status, out_text, err = nasdose("import", src, out, "--grid", "64", "-q")
    assert (status, out_text, err) == (0, "", "")
    with open_data(out) as data:
        assert data.ids() == ["pt_2", "pt_3", "pt_10"] and data.splits() == {"train": data.ids()}
        for pid in data.ids():
            expected = downsample_patient(read_npz_patient(src / f"{pid}.npz"), 2)
            got = data.read(pid)
            assert got.voxel_mm == expected.voxel_mm and got.attrs["resample_factor"] == 2
            assert np.array_equal(got.ct, expected.ct) and np.array_equal(got.dose, expected.dose)
            assert got.structures.keys() == expected.structures.keys()
            assert all(np.array_equal(got.structures[n], m) for n, m in expected.structures.items())
    assert [f.name for f in out.parent.iterdir()] == ["d64.h5"]


@pytest.mark.openkbp
def test_info_of_a_data_set(csv_import32, nasdose):
    status, text, _ = nasdose("info", csv_import32)
    assert status == 0
    with open_data(csv_import32) as data:
        maxima = [float(data.read_dose(pid).max()) for pid in data.ids()]
    lines = text.splitlines()
    assert lines[0] == f"{csv_import32}: nasdose dataset (format 2), grid 32^3"
    assert "patients: 3 (train 2, validation 1)" in lines
    assert "voxel size 15.624 x 15.624 x 10 mm: 2 patients" in lines
    assert "resampled by 4 from the 128^3 grid: 3 patients" in lines
    assert "  PTV70           3/3" in lines and "  Esophagus       1/3" in lines
    assert (f"  max dose per patient: mean {np.mean(maxima):.2f} Gy, "
            f"range {min(maxima):.2f}-{max(maxima):.2f} Gy") in lines
    assert any(line.startswith("  mean PTV70 dose per patient: mean ") for line in lines)


def test_info_of_a_prediction_file(tmp_path, nasdose):
    path = tmp_path / "pred.h5"
    doses = [("pt_1", np.full((4, 4, 4), 2.0), {}), ("pt_2", np.full((4, 4, 4), 6.0), {})]
    write_predictions(path, doses, grid=4, source="ensemble")
    status, text, _ = nasdose("info", path)
    assert status == 0
    assert text.splitlines()[:4] == [f"{path}: nasdose predictions (format 2), grid 4^3", "source: ensemble",
                                     "patients: 2", "ids: pt_1, pt_2"]
    assert "  max dose per patient: mean 4.00 Gy, range 2.00-6.00 Gy" in text


def _write_bad_inputs(root):
    """One bad input of each kind, and the file its error must name."""
    csv = root / "csv" / "train-pats" / "pt_1"
    csv.mkdir(parents=True)
    (csv / "ct.csv").write_text(",data\n532261,18.0\n532645,six\n")
    (csv / "possible_dose_mask.csv").write_text(",data\n532261,\n")
    (csv / "voxel_dimensions.csv").write_text("3.906\n3.906\n2.5\n")
    good = {"ct": np.zeros((4, 4, 4), np.int16), "possible_dose_mask": np.ones((4, 4, 4), bool),
            "voxel_dimensions_mm": np.array([3.906, 3.906, 2.5], np.float32)}
    for name, change in [("nan", {"ct": np.full((4, 4, 4), np.nan, np.float32)}),
                         ("shape", {"dose": np.zeros((4, 4, 2), np.float32)})]:
        (root / name).mkdir()
        np.savez(root / name / "pt_1.npz", **{**good, **change})
    (root / "empty").mkdir()
    return [(root / "csv", csv / "ct.csv", "line 3"),
            (root / "nan", root / "nan" / "pt_1.npz", "the CT holds NaN"),
            (root / "shape", root / "shape" / "pt_1.npz", "array 'dose' has shape (4, 4, 2)"),
            (root / "empty", root / "empty", "no OpenKBP patients found")]


def test_bad_inputs_fail_with_one_line_and_no_output(tmp_path, nasdose):
    out_dir = tmp_path / "out"
    for src, named, problem in _write_bad_inputs(tmp_path / "in"):
        status, out_text, err = nasdose("import", src, out_dir / "d.h5", "--grid", "2", "-q")
        assert status == 1 and out_text == ""
        assert err.count("\n") == 1 and err.startswith(f"nasdose data: error: {named}: {problem}")
        assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_info_of_truncated_file(tmp_path, nasdose):
    bad = tmp_path / "bad.h5"
    write_predictions(bad, [("pt_1", np.ones((16, 16, 16)), {})], grid=16)
    bad.write_bytes(bad.read_bytes()[:3000])
    status, out_text, err = nasdose("info", bad, "-q")
    assert (status, out_text) == (1, "")
    assert err == f"nasdose data: error: {bad}: not a readable HDF5 file (truncated or of another kind)\n"


@pytest.mark.openkbp
def test_import_rejects_a_grid_that_does_not_divide(openkbp_dir, tmp_path, nasdose):
    status, _, err = nasdose("import", openkbp_dir / "csv" / "train-pats" / "pt_1", tmp_path / "d.h5",
                             "--grid", "48", "-q")
    assert status == 1
    assert err == ("nasdose data: error: grid 48: does not divide the source grid 128 "
                   "(use a divisor, e.g. 64 or 32)\n")
    assert list(tmp_path.iterdir()) == []


def test_synth(tmp_path, nasdose):
    pytest.importorskip("nas_dose.data.synth")
    out = tmp_path / "s.h5"
    status, _, _ = nasdose("synth", out, "--patients", "3", "--grid", "16", "--seed", "5", "-q")
    assert status == 0
    with open_data(out) as data:
        assert (data.grid, len(data), data.attrs["source"]) == (16, 3, "synth:seed=5")
        p = data.read(data.ids()[0])
        assert p.grid == 16 and p.attrs["split"] in ("train", "validation", "test")
    with h5py.File(out) as f:
        assert f.attrs["nasdose_format"] == "dataset"
    more = tmp_path / "u.h5"
    assert nasdose("synth", more, "--patients", "3", "--unlabeled", "2", "--grid", "16", "--seed", "5", "-q")[0] == 0
    with open_data(more) as data:
        assert data.ids("unlabeled") == ["pt_4", "pt_5"] and not data.has_dose("pt_4") and data.has_dose("pt_3")


def test_an_existing_data_set_is_replaced_only_when_asked(tmp_path, nasdose):
    out = tmp_path / "s.h5"
    assert nasdose("synth", out, "--patients", "3", "--grid", "16", "-q")[0] == 0
    before = out.read_bytes()
    status, _, err = nasdose("synth", out, "--patients", "4", "--grid", "16", "-q")
    assert status == 1 and f"{out}: exists; give --force to replace it" in err and err.count("\n") == 1
    assert out.read_bytes() == before
    assert nasdose("synth", out, "--patients", "4", "--grid", "16", "--force", "-q")[0] == 0
    with open_data(out) as data:
        assert len(data) == 4
