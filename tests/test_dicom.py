"""DICOM RT patients: a CT series, an RTSTRUCT made from masks and an RT Dose on a grid of its
own, written here from phantoms and a real OpenKBP patient, read back onto the CT's grid; and
predicted doses written as RT Dose files that an independent reader (dicompyler-core, skipped
where absent) reads with the same dose and DVHs."""
from __future__ import annotations

from pathlib import Path

import contourpy
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from nas_dose.data.dicom import CT_STORAGE, RT_STRUCT_STORAGE, Grid, new_dataset, read_dicom_patient, rt_dose, save
from nas_dose.data.dicom import set_geometry
from nas_dose.data.patient import Patient
from nas_dose.data.synth import synth_patient
from nas_dose.errors import NasDoseError

ORIGIN = (-212.4, -163.75, -91.5)  # mm: any position, as a scanner's


def to_dicom_order(array: np.ndarray) -> np.ndarray:
    """OpenKBP axis order (A->P, R->L, S->I) -> DICOM (i, j, k) of an axial head-first-supine CT:
    i along +x (to the left), j along +y (posterior), k along +z (superior)."""
    return np.ascontiguousarray(array.transpose(1, 0, 2)[:, :, ::-1])


def ct_grid(p: Patient) -> Grid:
    v0, v1, v2 = p.voxel_mm
    n0, n1, n2 = p.ct.shape
    return Grid((n1, n0, n2), (v1, v0, v2), ORIGIN, np.eye(3))


def contours(mask: np.ndarray, grid: Grid) -> list[np.ndarray]:
    """A mask's outlines, slice by slice, as world points (contourpy's marching squares at 0.5
    around the padded slice: each mask pixel's centre is inside, each other one's outside)."""
    found = []
    for k in range(mask.shape[2]):
        if not mask[:, :, k].any():
            continue
        padded = np.pad(mask[:, :, k], 1).astype(np.float64)
        for line in contourpy.contour_generator(z=padded).lines(0.5):
            ij = np.stack([line[:, 1] - 1, line[:, 0] - 1, np.full(len(line), k)], axis=1)  # x is axis 1
            found.append(grid.world(ij))
    return found


def identity(p: Patient) -> dict[str, str]:
    return {"PatientID": p.id, "PatientName": f"Phantom^{p.id}", "StudyInstanceUID": f"1.2.826.0.1.3680043.10.1.{len(p.id)}",
            "FrameOfReferenceUID": "1.2.826.0.1.3680043.10.2.7"}


def write_dicom_patient(folder: Path, p: Patient, names: dict[str, str] | None = None,
                        dose_step: int = 2) -> Grid:
    """Patient `p` as DICOM files: CT slices (HU, named in reverse order so that only their
    positions sort them), an RTSTRUCT of the masks' outlines (renamed by `names`) and, with a
    dose, an RT Dose on a grid `dose_step` times coarser in-plane, shifted by half a CT voxel."""
    folder.mkdir(parents=True)
    grid, who = ct_grid(p), identity(p)
    hu = to_dicom_order(p.ct) - 1024
    series = None
    for k in range(grid.shape[2]):
        ds = new_dataset(CT_STORAGE, "CT", who)
        series = series or ds.SeriesInstanceUID
        ds.SeriesInstanceUID = series
        set_geometry(ds, Grid(grid.shape, grid.spacing, tuple(grid.world(np.array([0, 0, k]))), grid.direction))
        ds.SliceThickness = grid.spacing[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.rint(hu[:, :, k].T + 1024).astype("<i2").tobytes()
        save(folder / f"ct_{grid.shape[2] - k:03d}.dcm", ds)
    struct = new_dataset(RT_STRUCT_STORAGE, "RTSTRUCT", who)
    frame = Dataset()
    frame.FrameOfReferenceUID = who["FrameOfReferenceUID"]
    struct.ReferencedFrameOfReferenceSequence = Sequence([frame])
    rois, outlines = [], []
    for number, (roi, mask) in enumerate(p.structures.items(), start=1):
        item = Dataset()
        item.ROINumber, item.ROIName = number, (names or {}).get(roi, roi)
        rois.append(item)
        outline = Dataset()
        outline.ReferencedROINumber = number
        outline.ContourSequence = Sequence()
        for points in contours(to_dicom_order(mask), grid):
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(points)
            c.ContourData = [f"{v:.6g}" for v in points.ravel()]
            outline.ContourSequence.append(c)
        outlines.append(outline)
    struct.StructureSetROISequence, struct.ROIContourSequence = Sequence(rois), Sequence(outlines)
    save(folder / "rtstruct.dcm", struct)
    if p.dose is not None:
        dose = to_dicom_order(p.dose)[::dose_step, ::dose_step]
        step = np.asarray(grid.spacing) * (dose_step, dose_step, 1)
        coarse = Grid(dose.shape, tuple(step), tuple(grid.world(np.array([0.0, 0.0, 0.0]))), grid.direction)
        save(folder / "rtdose.dcm", rt_dose(dose, coarse, who))
    return grid


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom() -> Patient:
    return synth_patient(0, 64, seed=3)


@pytest.fixture(scope="module")
def phantom_dicom(phantom, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / phantom.id
    write_dicom_patient(folder, phantom, names={"SpinalCord": "Cord", "PTV70": "PTV_70"})
    return folder


ALIASES = {"cord": "SpinalCord", "ptv_70": "PTV70"}


def test_read_puts_every_volume_on_the_ct_grid(phantom, phantom_dicom):
    got = read_dicom_patient(phantom_dicom, ALIASES)
    assert got.grid.shape == (64, 64, 64) and got.grid.origin == pytest.approx(ORIGIN)
    assert got.grid.spacing == pytest.approx((phantom.voxel_mm[1], phantom.voxel_mm[0], phantom.voxel_mm[2]))
    np.testing.assert_allclose(got.ct_hu, np.rint(to_dicom_order(phantom.ct)) - 1024)
    assert sorted(got.structures) == sorted(phantom.structures)
    for roi, mask in phantom.structures.items():
        assert dice(got.structures[roi], to_dicom_order(mask)) >= 0.99, roi
    # the dose was written every second voxel in-plane: those voxels read back exactly (to the
    # 32-bit quantisation), the ones between are linear interpolations of their neighbours
    assert got.dose_gy is not None
    want = to_dicom_order(phantom.dose)
    np.testing.assert_allclose(got.dose_gy[::2, ::2], want[::2, ::2], atol=1e-4)
    np.testing.assert_allclose(got.dose_gy[1:-1:2, ::2], 0.5 * (want[0:-2:2, ::2] + want[2::2, ::2]), atol=1e-4)
    assert not got.dose_gy[-1].any()  # beyond the dose grid
    assert got.attrs["dicom_FrameOfReferenceUID"] == "1.2.826.0.1.3680043.10.2.7"


def test_unmapped_structure_names_are_one_clear_error(phantom_dicom):
    with pytest.raises(NasDoseError) as e:
        read_dicom_patient(phantom_dicom, {})
    assert str(e.value).count("\n") == 0 and "Cord" in str(e.value) and "PTV_70" in str(e.value)
