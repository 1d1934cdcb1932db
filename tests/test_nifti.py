"""NIfTI patients: imported from any orientation into OpenKBP axis order exactly, structures from
masks, a label map or an alias table, and predicted doses written back in the source's
orientation and affine."""
import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from nas_dose import cli
from nas_dose.cli.predict import main as predict_main
from nas_dose.config import ConfigError, load_config
from nas_dose.data.geometry import Geometry
from nas_dose.data.nifti import openkbp_geometry, read_nifti_patient
from nas_dose.data.patient import ROIS, Patient
from nas_dose.data.resample import downsample_patient
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import synth_patient, synth_patients
from nas_dose.errors import NasDoseError
from nas_dose.predict import Config as PredictConfig

KBP = ("P", "L", "I")  # OpenKBP axis order as nibabel axis codes
FILE_CODES = ("R", "A", "S")  # the files' order: every axis flipped, axes 0 and 1 swapped
# World axis (RAS+) and sign of each axis code; the OpenKBP axis along each world axis.
WORLD = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
KBP_AXIS = {0: 1, 1: 0, 2: 2}


def file_affine(codes: tuple[str, ...], voxel_mm: tuple[float, ...]) -> np.ndarray:
    """An affine whose voxel axes run along `codes`, with the patient's voxel sizes and an offset."""
    affine = np.zeros((4, 4))
    for i, code in enumerate(codes):
        world, sign = WORLD[code]
        affine[world, i] = sign * voxel_mm[KBP_AXIS[world]]
    affine[:, 3] = (-40.5, 12.25, 7.0, 1.0)
    return affine


def to_file(array: np.ndarray, codes: tuple[str, ...]) -> np.ndarray:
    return apply_orientation(array, ornt_transform(axcodes2ornt(KBP), axcodes2ornt(codes)))


def save(path: Path, array: np.ndarray, affine: np.ndarray, codes: tuple[str, ...]) -> None:
    nib.save(nib.Nifti1Image(to_file(array, codes), affine), path)


def write_patient(folder: Path, p: Patient, codes: tuple[str, ...] = FILE_CODES, *, names: dict[str, str] | None = None,
                  label_map: bool = False, mask: bool = True) -> np.ndarray:
    """Phantom `p` as a NIfTI folder in the orientation `codes` (CT in HU, float64 so it comes back
    exact); structures as masks (renamed by `names`) or one label map painted in ROIS order.
    Returns the files' affine as read back (the header holds it in float32)."""
    folder.mkdir(parents=True)
    affine = file_affine(codes, p.voxel_mm)
    save(folder / "ct.nii.gz", p.ct.astype(np.float64) - 1024, affine, codes)
    if p.dose is not None:
        save(folder / "dose.nii.gz", p.dose, affine, codes)
    if mask:
        save(folder / "possible_dose_mask.nii.gz", p.possible_dose_mask.astype(np.uint8), affine, codes)
    names = names or {}
    if label_map:
        labels = np.zeros(p.ct.shape, np.uint8)
        for i, roi in enumerate(ROIS, start=1):
            if roi in p.structures:
                labels[p.structures[roi]] = i
        save(folder / "labels.nii.gz", labels, affine, codes)
        (folder / "labels.json").write_text(json.dumps({str(i): names.get(roi, roi) for i, roi in enumerate(ROIS, 1)}))
    else:
        for roi, m in p.structures.items():
            save(folder / f"{names.get(roi, roi)}.nii.gz", m.astype(np.uint8), affine, codes)
    return nib.load(folder / "ct.nii.gz").affine


def assert_same_patient(got: Patient, want: Patient) -> None:
    np.testing.assert_array_equal(got.ct, want.ct)
    np.testing.assert_array_equal(got.possible_dose_mask, want.possible_dose_mask)
    assert got.dose is not None and want.dose is not None
    np.testing.assert_array_equal(got.dose, want.dose)
    assert sorted(got.structures) == sorted(want.structures)
    for roi, m in want.structures.items():
        np.testing.assert_array_equal(got.structures[roi], m, err_msg=roi)
    assert got.voxel_mm == pytest.approx(want.voxel_mm, abs=1e-6)


def nasdose(*argv: object) -> int:
    """The command line in this process (each call sets --quiet anew; conftest resets it after a test)."""
    return cli.main([*map(str, argv)])


@pytest.fixture(scope="module")
def phantoms() -> list[Patient]:
    return list(synth_patients(4, 32, seed=1))


@pytest.fixture(scope="module")
def tree(phantoms, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """The phantoms as NIfTI folders in train/ and validation/; returns the root and each affine."""
    root = tmp_path_factory.mktemp("nifti")
    affines = {p.id: write_patient(root / p.attrs["split"] / p.id, p) for p in phantoms}
    return root, affines


@pytest.fixture(scope="module")
def imported(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "nifti16.h5"
    assert nasdose("data", "import", tree[0], out, "--grid", "16", "-q") == 0
    return out


def test_import_round_trip_is_exact(phantoms, tree, imported):
    with open_data(imported) as data:
        assert data.attrs["source"] == f"nifti:{tree[0].resolve()}" and data.grid == 16
        assert data.ids() == [p.id for p in phantoms]
        for p in phantoms:
            attrs = data.patient_attrs(p.id)
            assert attrs["split"] == p.attrs["split"] and attrs["source_grid"] == 32
            original = Geometry.from_attrs(attrs, "original")
            assert original is not None and original.shape == (32, 32, 32)
            np.testing.assert_array_equal(original.ras_affine(), tree[1][p.id])
            assert original.spacing == pytest.approx([p.voxel_mm[1], p.voxel_mm[0], p.voxel_mm[2]])
            assert_same_patient(data.read_source(p.id), p)
            assert_same_patient(data.read(p.id), downsample_patient(p, 2))


@pytest.mark.parametrize("codes", [("L", "S", "P"), ("I", "P", "R")])
def test_any_orientation_reads_back_in_openkbp_order(tmp_path, codes):
    p = synth_patient(0, 16, seed=2)
    write_patient(tmp_path / "pt_1", p, codes)
    assert_same_patient(read_nifti_patient(tmp_path / "pt_1"), p)


def test_label_map_with_aliases_and_the_body_as_mask(tmp_path):
    p = synth_patient(1, 16, seed=2)
    write_patient(tmp_path / "pt_2", p, label_map=True, mask=False, names={"SpinalCord": "Cord"})
    (tmp_path / "aliases.yaml").write_text("cord: SpinalCord\n")
    out = tmp_path / "d.h5"
    assert nasdose("data", "import", tmp_path / "pt_2", out, "--grid", "16", "-q") == 0
    with open_data(out) as data:
        got = data.read("pt_2")
    labels = np.zeros(p.ct.shape, np.uint8)
    for i, roi in enumerate(ROIS, start=1):
        if roi in p.structures:
            labels[p.structures[roi]] = i
    assert sorted(got.structures) == sorted(roi for i, roi in enumerate(ROIS, 1) if (labels == i).any())
    for roi, m in got.structures.items():
        np.testing.assert_array_equal(m, labels == ROIS.index(roi) + 1, err_msg=roi)
    np.testing.assert_array_equal(got.ct, p.ct)
    np.testing.assert_array_equal(got.possible_dose_mask, p.ct > 1024 - 500)
    assert got.attrs["possible_dose_mask_from"] == "CT > -500 HU"


def test_alias_table_maps_and_skips_names(tmp_path):
    p = synth_patient(2, 16, seed=2)
    write_patient(tmp_path / "pts" / "pt_3", p, names={"Brainstem": "brain_stem", "PTV70": "PTV_70"})
    folder = tmp_path / "pts" / "pt_3"
    nib.save(nib.load(folder / "PTV_70.nii.gz"), folder / "PTV_70.nii")  # uncompressed NIfTI too
    (folder / "PTV_70.nii.gz").unlink()
    (folder / "BODY.nii.gz").write_bytes((folder / "possible_dose_mask.nii.gz").read_bytes())
    table = tmp_path / "names.json"
    table.write_text(json.dumps({"Brain_Stem": "Brainstem", "PTV_70": "PTV70", "body": None}))
    out = tmp_path / "d.h5"
    assert nasdose("data", "import", tmp_path / "pts", out, "--grid", "16", "--aliases", table, "-q") == 0
    with open_data(out) as data:
        assert_same_patient(data.read("pt_3"), p)


def test_unmapped_names_and_a_mask_off_the_ct_grid_are_one_line_errors(tmp_path, capsys):
    p = synth_patient(0, 16, seed=2)
    for pid in ("pt_1", "pt_2"):
        write_patient(tmp_path / "pts" / pid, p, names={"Larynx": "GTV"})
    m = p.structures["Mandible"].astype(np.uint8)
    save(tmp_path / "pts" / "pt_2" / "Body.nii.gz", m, file_affine(FILE_CODES, p.voxel_mm), FILE_CODES)
    (tmp_path / "flat" / "pt_9").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.int16), np.eye(4)), tmp_path / "flat" / "pt_9" / "ct.nii.gz")
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # the mask's grid is 2 mm off the CT's
    nib.save(nib.Nifti1Image(np.ones((16, 16, 12), np.uint8), shifted), tmp_path / "flat" / "pt_9" / "PTV70.nii.gz")
    for src, message in [
            (tmp_path / "pts", f"{tmp_path / 'pts'}: structure names not in the ROI vocabulary or the alias table: "
                               "Body (pt_2); GTV (pt_1, pt_2); map them to one of Brainstem,"),
            (tmp_path / "flat", f"{tmp_path / 'flat' / 'pt_9' / 'PTV70.nii.gz'}: its voxel grid (shape, "
                                 "affine) differs from ct.nii.gz's")]:
        capsys.readouterr()
        assert nasdose("data", "import", src, tmp_path / "out" / "d.h5", "-q") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"nasdose data: error: {message}"), err
        assert not (tmp_path / "out" / "d.h5").exists()
    folder = tmp_path / "pts" / "pt_1"
    (folder / "Larynx.nii.gz").write_bytes((folder / "GTV.nii.gz").read_bytes())
    with pytest.raises(NasDoseError, match="GTV and Larynx are both Larynx"):
        read_nifti_patient(folder, aliases={"gtv": "Larynx"})


@pytest.fixture(scope="module")
def run(imported, train_tiny, tmp_path_factory) -> Path:
    """A tiny U-Net trained for one epoch on the imported phantoms."""
    return train_tiny(imported, tmp_path_factory.mktemp("runs") / "tiny")


def predict_nifti(model: Path, data: Path, out: Path, force: bool = False) -> None:
    predict_main(argparse.Namespace(model=model, data=data, out=out, split=None, tta=False, csv=None,
                                    format="nifti", preference=None, sweep=None, config=None, force=force,
                                    overrides=["runtime.device=cpu", "runtime.threads=1"]))


def test_predict_nifti_writes_the_source_grid_dose_in_the_source_geometry(tree, imported, run, tmp_path):
    out = tmp_path / "pred"
    (out / "submission").mkdir(parents=True)  # an earlier run's CSVs do not stay
    predict_nifti(run, imported, out, force=True)
    assert not (out / "submission").exists() and not list(out.glob(".*"))
    with open_data(imported) as data, open_data(out / "predictions.h5") as preds:
        assert sorted(p.name for p in (out / "nifti").iterdir()) == sorted(f"{pid}.nii.gz" for pid in data.ids())
        for pid in data.ids():
            image = nib.load(out / "nifti" / f"{pid}.nii.gz")
            source = nib.load(tree[0] / data.patient_attrs(pid)["split"] / pid / "ct.nii.gz")
            np.testing.assert_array_equal(image.affine, source.affine)
            assert image.get_data_dtype() == np.float32 and image.shape == source.shape
            want = data.to_source_grid(pid, preds.read_dose(pid))
            np.testing.assert_array_equal(np.asanyarray(image.dataobj), to_file(want, FILE_CODES))


def test_predict_nifti_of_openkbp_patients_uses_their_voxel_size(phantoms, run, tmp_path):
    data_path = tmp_path / "kbp16.h5"
    write_dataset(data_path, (downsample_patient(p, 2) for p in phantoms[:2]), source="synth32", grid=16)
    out = tmp_path / "pred"
    predict_nifti(run, data_path, out)
    with open_data(data_path) as data, open_data(out / "predictions.h5") as preds:
        for p in phantoms[:2]:
            image = nib.load(out / "nifti" / f"{p.id}.nii.gz")
            np.testing.assert_allclose(image.affine, openkbp_geometry(p.ct.shape, p.voxel_mm).ras_affine(), rtol=1e-6)
            assert nib.aff2axcodes(image.affine) == KBP
            np.testing.assert_array_equal(np.asanyarray(image.dataobj),
                                          data.to_source_grid(p.id, preds.read_dose(p.id)))


def test_format_is_checked():
    with pytest.raises(ConfigError, match="'format': one of csv, nifti"):
        load_config(PredictConfig, overrides=["format=xml"])
