"""DICOM RT patients: a CT series, an RTSTRUCT made from masks and an RT Dose on a grid of its
own, written here from phantoms and a real OpenKBP patient, read onto the CT's grid and imported;
predicted doses written as RT Dose files that an independent reader (dicompyler-core, skipped
where absent) reads with the same dose and DVHs."""
from __future__ import annotations

from pathlib import Path

import contourpy
import numpy as np
import pydicom
import pydicom.dicomio
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, RTDoseStorage, RTStructureSetStorage

from nas_dose import cli
from nas_dose.data.dicom import new_dataset, read_dicom_volumes, rt_dose, save, set_geometry
from nas_dose.data.geometry import Geometry, dose_on_original, resample
from nas_dose.data.openkbp import read_npz_patient
from nas_dose.data.patient import Patient
from nas_dose.data.store import open_data
from nas_dose.data.synth import synth_patient
from nas_dose.errors import NasDoseError

ORIGIN = (-212.4, -163.75, -91.5)  # mm: any position, as a scanner's
FRAME = "1.2.826.0.1.3680043.10.2.7"
ALIASES = {"cord": "SpinalCord", "ptv_70": "PTV70"}
NAMES = {"SpinalCord": "Cord", "PTV70": "PTV_70"}  # as a clinic may name them; ALIASES maps them back


def to_dicom_order(array: np.ndarray) -> np.ndarray:
    """OpenKBP axis order (A->P, R->L, S->I) -> DICOM (i, j, k) of an axial head-first-supine CT:
    i along +x (to the patient's left), j along +y (posterior), k along +z (superior)."""
    return np.ascontiguousarray(array.transpose(1, 0, 2)[:, :, ::-1])


def ct_geometry(p: Patient, slices: int) -> Geometry:
    v0, v1, v2 = p.voxel_mm
    return Geometry((p.ct.shape[1], p.ct.shape[0], slices), (v1, v0, v2), ORIGIN, tuple(np.eye(3).ravel()))


def world(geometry: Geometry, ijk: np.ndarray) -> np.ndarray:
    return ijk @ geometry.affine()[:3, :3].T + geometry.affine()[:3, 3]


def outlines(mask: np.ndarray, geometry: Geometry) -> list[np.ndarray]:
    """A mask's outlines, slice by slice, in LPS mm (contourpy's marching squares at 0.5 around
    the zero-padded slice: each mask pixel's centre is inside, each other one's outside)."""
    found = []
    for k in np.flatnonzero(mask.any(axis=(0, 1))):
        padded = np.pad(mask[:, :, k], 1).astype(np.float64)
        for line in contourpy.contour_generator(z=padded).lines(0.5):
            ijk = np.stack([line[:, 1] - 1, line[:, 0] - 1, np.full(len(line), k)], axis=1)  # x runs along axis 1
            found.append(world(geometry, ijk))
    return found


def write_dicom_patient(folder: Path, p: Patient, *, slices: int | None = None, names: dict[str, str] | None = None,
                        body: bool = False, dose_step: int = 2) -> Geometry:
    """Patient `p` (its first `slices` axial slices from the top) as DICOM files: CT slices (HU,
    named in reverse order, so only their positions sort them), an RTSTRUCT of the masks'
    outlines (renamed by `names`; with `body`, the possible-dose mask as an EXTERNAL ROI) and an
    RT Dose on a grid of its own, `dose_step` times as coarse in-plane. Returns the CT's geometry."""
    folder.mkdir(parents=True)
    slices = slices or p.ct.shape[2]
    geometry = ct_geometry(p, slices)

    def dicom(array: np.ndarray) -> np.ndarray:
        return to_dicom_order(array[:, :, :slices])

    who = {"PatientID": p.id, "PatientName": f"Phantom^{p.id}", "FrameOfReferenceUID": FRAME,
           "StudyInstanceUID": pydicom.uid.generate_uid()}
    hu = dicom(p.ct) - 1024
    series = pydicom.uid.generate_uid()
    for k in range(slices):
        ds = new_dataset(CTImageStorage, "CT", who)
        ds.SeriesInstanceUID = series
        set_geometry(ds, geometry, k)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.rint(hu[:, :, k].T + 1024).astype("<i2").tobytes()
        save(folder / f"ct_{slices - k:03d}.dcm", ds)
    struct = new_dataset(RTStructureSetStorage, "RTSTRUCT", who)
    reference = Dataset()
    reference.FrameOfReferenceUID = FRAME
    struct.ReferencedFrameOfReferenceSequence = Sequence([reference])
    masks = {(names or {}).get(roi, roi): m for roi, m in p.structures.items()}
    if body:
        masks["BODY"] = p.possible_dose_mask
    rois, contours, observations = Sequence(), Sequence(), Sequence()
    for number, (name, mask) in enumerate(masks.items(), start=1):
        roi, contour, observation = Dataset(), Dataset(), Dataset()
        roi.ROINumber, roi.ROIName = number, name
        contour.ReferencedROINumber = observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "EXTERNAL" if name == "BODY" else "ORGAN"
        contour.ContourSequence = Sequence()
        for points in outlines(dicom(mask), geometry):
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            c.ContourData = [f"{v:.6g}" for v in points.ravel()]
            contour.ContourSequence.append(c)
        rois.append(roi)
        contours.append(contour)
        observations.append(observation)
    struct.StructureSetROISequence, struct.ROIContourSequence = rois, contours
    struct.RTROIObservationsSequence = observations
    save(folder / "rtstruct.dcm", struct)
    if p.dose is not None:
        dose = dicom(p.dose)[::dose_step, ::dose_step]
        coarse = Geometry(dose.shape, (dose_step * geometry.spacing[0], dose_step * geometry.spacing[1],
                                       geometry.spacing[2]), geometry.origin, geometry.direction)
        save(folder / "rtdose.dcm", rt_dose(dose, coarse, who))
    return geometry


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def nasdose(*argv: object) -> int:
    """The command line in this process (each call sets --quiet anew; conftest resets it after a test)."""
    return cli.main([*map(str, argv)])


@pytest.fixture(scope="module")
def phantom() -> Patient:
    return synth_patient(0, 64, seed=3)


@pytest.fixture(scope="module")
def phantom_dicom(phantom, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / "validation" / phantom.id
    write_dicom_patient(folder, phantom, slices=48, names=NAMES)
    return folder


def test_read_puts_every_volume_on_the_ct_grid(phantom, phantom_dicom):
    got = read_dicom_volumes(phantom_dicom, ALIASES)
    assert got.geometry.shape == (64, 64, 48) and got.geometry.origin == pytest.approx(ORIGIN)
    assert got.geometry.spacing == pytest.approx((phantom.voxel_mm[1], phantom.voxel_mm[0], phantom.voxel_mm[2]))
    want = {name: to_dicom_order(a[:, :, :48]) for name, a in [("ct", phantom.ct), ("dose", phantom.dose)]}
    np.testing.assert_allclose(got.ct_hu, np.rint(want["ct"]) - 1024)
    assert sorted(got.structures) == sorted(r for r, m in phantom.structures.items() if m[:, :, :48].any())
    for roi, mask in got.structures.items():
        assert dice(mask, to_dicom_order(phantom.structures[roi][:, :, :48])) >= 0.99, roi
    # the RT Dose holds every second voxel in-plane; on the CT's grid those read back exactly (to
    # the 32-bit quantisation), the ones between as the mean of their neighbours, the last (beyond
    # the dose grid) as 0
    assert got.dose_gy is not None and got.dose_geometry is not None and got.external is None
    assert got.dose_geometry.spacing == pytest.approx(np.multiply(got.geometry.spacing, (2, 2, 1)))
    on_ct = resample(got.dose_gy, got.dose_geometry, got.geometry)
    np.testing.assert_allclose(on_ct[::2, ::2], want["dose"][::2, ::2], atol=1e-4)
    np.testing.assert_allclose(on_ct[1:-1:2, ::2], (want["dose"][0:-2:2, ::2] + want["dose"][2::2, ::2]) / 2,
                               atol=1e-4)
    assert not on_ct[-1].any()
    assert got.attrs["dicom_FrameOfReferenceUID"] == FRAME and got.attrs["dicom_PatientID"] == phantom.id


def test_unmapped_structure_names_are_one_clear_error(phantom_dicom, tmp_path):
    with pytest.raises(NasDoseError) as e:
        read_dicom_volumes(phantom_dicom)
    message = str(e.value)
    assert "\n" not in message and "Cord" in message and "PTV_70" in message
    assert nasdose("data", "import", phantom_dicom.parent, tmp_path / "d.h5", "--grid", "16", "-q") == 1
    assert not (tmp_path / "d.h5").exists()


def test_an_external_roi_is_the_possible_dose_mask(tmp_path):
    p = synth_patient(1, 32, seed=4)
    write_dicom_patient(tmp_path / p.id, p, body=True)
    got = read_dicom_volumes(tmp_path / p.id)
    assert got.external is not None and "BODY" not in got.structures
    assert dice(got.external, to_dicom_order(p.possible_dose_mask)) >= 0.99


@pytest.fixture(scope="module")
def model(data, train_tiny, tmp_path_factory) -> Path:
    """A tiny U-Net trained one epoch on the 16³ phantoms: real predictions, in seconds."""
    return train_tiny(data, tmp_path_factory.mktemp("run") / "unet")


def test_bad_folders_are_one_line_errors(phantom_dicom, tmp_path):
    folder = tmp_path / "src" / "pt_9"
    folder.mkdir(parents=True)
    for ct in sorted(phantom_dicom.glob("ct_*.dcm"))[:4]:
        (folder / ct.name).write_bytes(ct.read_bytes())
    assert nasdose("data", "import", folder.parent, tmp_path / "d.h5", "--grid", "16", "-q") == 1
    with pytest.raises(NasDoseError, match="pt_9: no RTSTRUCT file"):
        read_dicom_volumes(folder)
    (folder / "rtstruct.dcm").write_bytes((phantom_dicom / "rtstruct.dcm").read_bytes())
    (folder / "ct_002.dcm").unlink()  # a slice missing in the middle
    with pytest.raises(NasDoseError, match="CT: slices are not evenly spaced"):
        read_dicom_volumes(folder, ALIASES)
    assert not (tmp_path / "d.h5").exists()


def test_rt_dose_only_for_patients_from_dicom(data, model, tmp_path):
    assert nasdose("predict", "--model", model, "--data", data, "--out", tmp_path / "pred", "--format", "dicom",
                   "runtime.device=cpu", "-q") == 1
    assert not (tmp_path / "pred").exists()


@pytest.fixture(scope="module")
def dicompyler():
    """dicompyler-core (0.5.6 imports pydicom's `read_file`, which pydicom 3 renamed `dcmread`)."""
    if not hasattr(pydicom.dicomio, "read_file"):
        pydicom.dicomio.read_file = pydicom.dcmread
    return pytest.importorskip("dicompylercore.dvhcalc"), pytest.importorskip("dicompylercore.dose")


def round_trip(folder: Path, model: Path, out: Path, grid: int) -> tuple[Path, np.ndarray, Geometry, Path]:
    """Import a DICOM tree, predict with `model` to RT Dose files; returns the data set, the first
    patient's predicted dose on its CT's grid (as nasdose has it) with that grid, and its RT Dose."""
    data = out / "data.h5"
    assert nasdose("data", "import", folder, data, "--grid", grid, "--aliases", out / "aliases.yaml", "-q") == 0
    assert nasdose("predict", "--model", model, "--data", data, "--out", out / "pred", "--format", "dicom",
                   "runtime.device=cpu", "-q") == 0
    with open_data(data) as d, open_data(out / "pred" / "predictions.h5") as pred:
        pid = d.ids()[0]
        on_ct, geometry = dose_on_original(d.source_attrs(pid), d.to_source_grid(pid, pred.read_dose(pid)))
    return data, on_ct, geometry, out / "pred" / "dicom" / f"{pid}.dcm"


def check_rt_dose(path: Path, on_ct: np.ndarray, geometry: Geometry, struct: Path, masks: dict[str, np.ndarray],
                  dicompyler, names: dict[str, str]) -> dict[str, float]:
    """The RT Dose as dicompyler-core reads it: its grid equals nasdose's dose on the CT's grid
    (0.1 Gy), and dicompyler's DVH of each structure (from the RTSTRUCT's contours, on the dose
    grid) agrees with nasdose's (the imported masks): the mean dose to 0.05 Gy, and at every dose
    level of dicompyler's cumulative DVH (0.01 Gy bins) its volume lies between nasdose's at that
    dose plus and minus one bin. Returns the largest differences seen (dose and mean in Gy, the
    cumulative DVHs at equal doses in % of the volume, beyond one bin)."""
    dvhcalc, dose = dicompyler
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.SOPClassUID, ds.Modality, ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == \
        (RTDoseStorage, "RTDOSE", "GY", "PHYSICAL", "PLAN")
    assert ds.FrameOfReferenceUID == FRAME and pydicom.dcmread(struct).StudyInstanceUID == ds.StudyInstanceUID
    grid = dose.DoseGrid(str(path))
    for axis, values in enumerate(grid.axes):  # dicompyler's world axes are the CT's voxel centres
        centres = geometry.origin[axis] + geometry.spacing[axis] * np.arange(geometry.shape[axis])
        np.testing.assert_allclose(values, centres, atol=1e-3)
    assert grid.dose_grid.shape == on_ct.shape
    worst = {"dose": float(np.abs(grid.dose_grid - on_ct).max()), "mean": 0.0, "dvh": 0.0, "beyond_bin": 0.0}
    assert worst["dose"] < 0.1
    numbers = {str(roi.ROIName): int(roi.ROINumber) for roi in pydicom.dcmread(struct).StructureSetROISequence}
    for roi, mask in masks.items():
        ours = np.sort(on_ct[mask].astype(np.float64))
        theirs = dvhcalc.get_dvh(str(struct), str(path), numbers[names.get(roi, roi)], calculate_full_volume=False)
        worst["mean"] = max(worst["mean"], abs(theirs.mean - ours.mean()))
        assert theirs.mean == pytest.approx(ours.mean(), abs=0.05), roi
        levels, step = theirs.bins[:-1], theirs.bins[1] - theirs.bins[0]

        def volume(d: np.ndarray) -> np.ndarray:  # % of the structure receiving d or more
            return 100 * (1 - np.searchsorted(ours, d, side="left") / ours.size)

        v = theirs.relative_volume.counts
        worst["dvh"] = max(worst["dvh"], float(np.abs(v - volume(levels)).max()))
        beyond = float(np.maximum(volume(levels + step) - v, v - volume(levels - step)).max())
        worst["beyond_bin"] = max(worst["beyond_bin"], beyond)
        assert beyond <= 1e-6, roi
    return worst


def test_phantom_round_trip_reads_back_in_dicompyler(phantom, phantom_dicom, dicompyler, model, tmp_path):
    (tmp_path / "aliases.yaml").write_text("".join(f"{k}: {v}\n" for k, v in ALIASES.items()))
    dataset, on_ct, geometry, rt = round_trip(phantom_dicom.parent.parent, model, tmp_path, 16)
    with open_data(dataset) as d:
        attrs = d.source_attrs(phantom.id)
        assert attrs["split"] == "validation" and d.attrs["source"].startswith("dicom:")
        assert Geometry.from_attrs(attrs, "original") == geometry and geometry.shape == (64, 64, 48)
    assert on_ct.max() > 1  # a dose, not zeros
    volumes = read_dicom_volumes(phantom_dicom, ALIASES)
    worst = check_rt_dose(rt, on_ct, geometry, phantom_dicom / "rtstruct.dcm", volumes.structures, dicompyler, NAMES)
    print(f"phantom round trip: {worst}")


@pytest.mark.openkbp
@pytest.mark.slow
def test_real_openkbp_patient_round_trip(openkbp_dir, dicompyler, model, tmp_path):
    """pt_1 of OpenKBP as DICOM (128 CT slices, its contours, its dose): imported, its masks and
    dose are the patient's; predicted, its RT Dose reads back in dicompyler as nasdose's dose."""
    p = read_npz_patient(openkbp_dir / "npz128" / "train" / "pt_1.npz")
    folder = tmp_path / "dicom" / p.id
    write_dicom_patient(folder, p, names=NAMES, dose_step=1)
    (tmp_path / "aliases.yaml").write_text("".join(f"{k}: {v}\n" for k, v in ALIASES.items()))
    dataset, on_ct, geometry, rt = round_trip(tmp_path / "dicom", model, tmp_path, 16)
    with open_data(dataset) as d:
        got = d.read_source(p.id)  # on the source grid: the CT's 128³ voxels, only reoriented
    assert got.voxel_mm == pytest.approx(p.voxel_mm)
    np.testing.assert_allclose(got.ct, np.clip(np.rint(p.ct), 0, 4095))
    np.testing.assert_allclose(got.dose, p.dose, atol=1e-4)
    scores = {roi: dice(got.structures[roi], mask) for roi, mask in p.structures.items() if mask.sum() >= 20}
    assert min(scores.values()) >= 0.9, scores
    volumes = read_dicom_volumes(folder, ALIASES)
    worst = check_rt_dose(rt, on_ct, geometry, folder / "rtstruct.dcm", volumes.structures, dicompyler, NAMES)
    print(f"OpenKBP pt_1: Dice {min(scores.values()):.4f} (lowest of {len(scores)}), round trip {worst}")
