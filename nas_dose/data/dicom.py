"""DICOM RT patients: a CT series, its RTSTRUCT and an optional RT Dose read onto the CT's voxel
grid, and predicted doses written back as RT Dose files aligned with that CT.

A patient is one folder holding its DICOM files (any names; RTPLAN and other files are
ignored but for the plan's UID). Volumes are arrays indexed (i, j, k) = (column, row, slice) of
the CT series, with world (LPS, mm) position origin + direction @ (spacing * index): direction's
columns are the row and column cosines of ImageOrientationPatient and the slice normal, their
cross product, along which the slices are sorted. Contours are rasterised onto the CT's slices
with matplotlib's point-in-polygon test (pixel centres inside; contours on one slice combine by
exclusive or, so an inner contour is a hole, as dicompyler and most planning systems read them).
The RT Dose is interpolated (trilinear, zero outside its grid) at the CT's voxel centres.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from matplotlib.path import Path as Polygon
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid
from scipy.ndimage import map_coordinates

from ..errors import NasDoseError, input_error
from ..io import atomic_path
from .nifti import Aliases, check_names, roi_name

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# Positions that differ by less than this (mm) are the same: DICOM writes decimal strings.
TOLERANCE_MM = 1e-3
# The patient's DICOM identity, kept in the data set so that a prediction joins its study.
IDENTITY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
            "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID")
ATTR_PREFIX = "dicom_"


@dataclass
class Grid:
    """A voxel grid in DICOM patient coordinates (LPS, mm): voxel (i, j, k) is at
    origin + direction @ (spacing * (i, j, k)); direction's columns are unit vectors."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray  # 3x3

    def world(self, index: np.ndarray) -> np.ndarray:
        """World positions (..., 3) of voxel indices (..., 3)."""
        return np.asarray(self.origin) + (index * np.asarray(self.spacing)) @ self.direction.T


@dataclass
class DicomPatient:
    """One patient's volumes on the CT's grid, as read: CT in HU, masks keyed by ROI, dose in Gy."""

    id: str
    grid: Grid
    ct_hu: np.ndarray
    structures: dict[str, np.ndarray]
    dose_gy: np.ndarray | None
    attrs: dict[str, Any] = field(default_factory=dict)  # dicom_* identity and references


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and is_dicom(f))


def is_dicom_patient(path: Path) -> bool:
    """A patient folder of the DICOM layout: it holds DICOM files (with the DICM preamble)."""
    return path.is_dir() and not path.name.startswith(".") and bool(_files(path))


def _read(path: Path, pixels: bool = False) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as e:
        raise input_error(path, f"not a readable DICOM file ({type(e).__name__})") from None


def _by_modality(folder: Path) -> dict[str, list[tuple[Path, Dataset]]]:
    found: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in _files(folder):
        ds = _read(path)
        found.setdefault(str(ds.get("Modality", "")), []).append((path, ds))
    return found


def _one(folder: Path, files: dict[str, list[tuple[Path, Dataset]]], modality: str,
         required: bool) -> tuple[Path, Dataset] | None:
    found = files.get(modality, [])
    if len(found) > 1:
        raise input_error(folder, f"{len(found)} {modality} files ({', '.join(p.name for p, _ in found[:4])}); "
                                  f"keep the one that goes with the CT")
    if not found and required:
        raise input_error(folder, f"no {modality} file")
    return found[0] if found else None


def _roi_names(ds: Dataset) -> dict[int, str]:
    return {int(item.ROINumber): str(item.ROIName).strip() for item in ds.get("StructureSetROISequence", [])}


def structure_names(folder: Path) -> list[str]:
    """The ROI names of a patient's RTSTRUCT."""
    found = _one(folder, _by_modality(folder), "RTSTRUCT", required=True)
    assert found is not None  # required
    return sorted(_roi_names(found[1]).values())


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.shape != (n,) or not np.isfinite(array).all():
        raise input_error(path, f"{keyword}: expected {n} numbers, got {value!r}")
    return array


def _direction(ds: Dataset, path: Path) -> np.ndarray:
    """ImageOrientationPatient's row and column cosines and their cross product, as columns."""
    cosines = _floats(ds, "ImageOrientationPatient", 6, path)
    u, v = cosines[:3], cosines[3:]
    if abs(np.linalg.norm(u) - 1) > 1e-3 or abs(np.linalg.norm(v) - 1) > 1e-3 or abs(u @ v) > 1e-3:
        raise input_error(path, f"ImageOrientationPatient {cosines.tolist()} is not two orthogonal unit vectors")
    return np.stack([u, v, np.cross(u, v)], axis=1)


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except (AttributeError, ValueError, RuntimeError, NotImplementedError) as e:
        raise input_error(path, f"cannot read the pixels ({type(e).__name__}: {e})") from None


def _uniform(offsets: np.ndarray, path: Path, what: str) -> float:
    """The common step of sorted slice offsets (mm); an error unless they are evenly spaced."""
    steps = np.diff(offsets)
    if len(steps) == 0:
        raise input_error(path, f"{what}: a single slice; a volume needs two or more")
    if steps.min() < TOLERANCE_MM:
        raise input_error(path, f"{what}: two slices at the same position")
    if steps.max() - steps.min() > 0.01 * steps.mean() + TOLERANCE_MM:
        raise input_error(path, f"{what}: slices are not evenly spaced (steps {steps.min():g} to {steps.max():g} mm)")
    return float((offsets[-1] - offsets[0]) / len(steps))


def read_ct(folder: Path, slices: Sequence[tuple[Path, Dataset]]) -> tuple[Grid, np.ndarray, Dataset]:
    """A CT series -> its grid, the HU volume (i, j, k; float32) and its first slice's header."""
    if not slices:
        raise input_error(folder, "no CT slices")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise input_error(folder, f"{len(series)} CT series; keep one per patient folder")
    path0, ds0 = slices[0]
    direction = _direction(ds0, path0)
    rows, columns = int(ds0.Rows), int(ds0.Columns)
    row_mm, column_mm = _floats(ds0, "PixelSpacing", 2, path0)
    positions = []
    for path, ds in slices:
        if int(ds.Rows) != rows or int(ds.Columns) != columns:
            raise input_error(path, f"{ds.Rows}x{ds.Columns} pixels, other slices {rows}x{columns}")
        if not np.allclose(_direction(ds, path), direction, atol=1e-4) or \
                not np.allclose(_floats(ds, "PixelSpacing", 2, path), (row_mm, column_mm), atol=TOLERANCE_MM):
            raise input_error(path, "orientation or pixel spacing differs from the other slices")
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))
    offsets = np.array(positions) @ direction[:, 2]
    order = np.argsort(offsets)
    positions = [positions[n] for n in order]
    origin = positions[0]
    for n, position in enumerate(positions):  # a tilted gantry shifts slices within their plane
        if np.abs((position - origin) @ direction[:, :2]).max() > 0.01:
            raise input_error(slices[order[n]][0], "slice not on the line of the first one's normal "
                                                   "(gantry tilt); resample the series first")
    step = _uniform(offsets[order], folder, "CT")
    volume = np.empty((columns, rows, len(slices)), dtype=np.float32)
    for k, n in enumerate(order):
        path, _ = slices[n]
        ds = _read(path, pixels=True)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        volume[:, :, k] = (_pixels(ds, path).astype(np.float64) * slope + intercept).T
    grid = Grid((columns, rows, len(slices)), (float(column_mm), float(row_mm), step),
                tuple(float(x) for x in origin), direction)  # type: ignore[arg-type]
    return grid, volume, ds0


def _rasterise(contours: list[np.ndarray], grid: Grid) -> np.ndarray:
    """Closed planar contours (world points, n x 3) as a mask on the grid: per slice, the exclusive
    or of the polygons' insides (pixel centres)."""
    mask = np.zeros(grid.shape, dtype=bool)
    inverse = np.linalg.inv(grid.direction * np.asarray(grid.spacing))
    for points in contours:
        index = (points - np.asarray(grid.origin)) @ inverse.T  # (n, 3) continuous voxel indices
        k = int(round(float(index[:, 2].mean())))
        if not 0 <= k < grid.shape[2]:
            continue
        lo = np.clip(np.floor(index[:, :2].min(axis=0)).astype(int), 0, None)
        hi = np.minimum(np.ceil(index[:, :2].max(axis=0)).astype(int), np.array(grid.shape[:2]) - 1)
        if (hi < lo).any():
            continue
        i, j = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
        inside = Polygon(index[:, :2]).contains_points(np.stack([i.ravel(), j.ravel()], axis=1)).reshape(i.shape)
        mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, k] ^= inside
    return mask


def read_structures(path: Path, ds: Dataset, grid: Grid, aliases: Aliases) -> dict[str, np.ndarray]:
    """An RTSTRUCT's closed planar contours rasterised onto the grid, keyed by ROI (names mapped
    by `roi_name`; skipped names and structures without contours are left out)."""
    names = _roi_names(ds)
    found: dict[str, tuple[str, np.ndarray]] = {}
    for item in ds.get("ROIContourSequence", []):
        name = names.get(int(item.ReferencedROINumber))
        if name is None:
            raise input_error(path, f"contours of ROI number {item.ReferencedROINumber}, which has no name")
        roi = roi_name(name, aliases)
        contours = []
        for contour in item.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "")) != "CLOSED_PLANAR":
                continue
            data = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64)
            if data.size < 9 or data.size % 3:
                raise input_error(path, f"{name}: a contour of {data.size} numbers, not 3 or more points")
            contours.append(data.reshape(-1, 3))
        if roi is None or not contours:
            continue
        if roi in found:
            raise input_error(path, f"{found[roi][0]} and {name} are both {roi}")
        found[roi] = (name, _rasterise(contours, grid))
    return {roi: mask for roi, (_, mask) in found.items()}


def dose_grid(path: Path, ds: Dataset) -> Grid:
    """An RT Dose's grid (frames along the normal, GridFrameOffsetVector relative or absolute)."""
    frames = int(ds.get("NumberOfFrames", 1))
    offsets = _floats(ds, "GridFrameOffsetVector", frames, path)
    offsets = offsets - offsets[0]  # absolute offsets start at the first frame's position
    direction = _direction(ds, path)
    if np.any(np.diff(offsets) < 0):
        raise input_error(path, "GridFrameOffsetVector does not increase")
    row_mm, column_mm = _floats(ds, "PixelSpacing", 2, path)
    step = _uniform(offsets, path, "RT Dose") if frames > 1 else 1.0
    origin = _floats(ds, "ImagePositionPatient", 3, path)
    return Grid((int(ds.Columns), int(ds.Rows), frames), (float(column_mm), float(row_mm), step),
                tuple(float(x) for x in origin), direction)  # type: ignore[arg-type]


def read_dose(path: Path, ct_grid: Grid) -> np.ndarray:
    """An RT Dose (Gy) interpolated at the CT grid's voxel centres: trilinear, 0 outside its grid."""
    ds = _read(path, pixels=True)
    units = str(ds.get("DoseUnits", "")).upper()
    if units != "GY":
        raise input_error(path, f"DoseUnits {units or 'missing'}: nasdose reads absolute doses in GY only")
    grid = dose_grid(path, ds)
    pixels = _pixels(ds, path).reshape(grid.shape[2], grid.shape[1], grid.shape[0])
    dose = pixels.transpose(2, 1, 0).astype(np.float64) * float(ds.get("DoseGridScaling", 1.0))
    to_index = np.linalg.inv(grid.direction * np.asarray(grid.spacing))
    out = np.empty(ct_grid.shape, dtype=np.float32)
    i, j = np.meshgrid(np.arange(ct_grid.shape[0]), np.arange(ct_grid.shape[1]), indexing="ij")
    for k in range(ct_grid.shape[2]):  # a slice at a time: a whole CT's coordinates would not fit
        world = ct_grid.world(np.stack([i, j, np.full_like(i, k)], axis=-1).astype(np.float64))
        index = (world - np.asarray(grid.origin)) @ to_index.T
        # a single-frame dose is a plane: a CT slice within half a voxel of it reads it
        if grid.shape[2] == 1:
            index[..., 2] = np.where(np.abs(index[..., 2]) <= 0.5, 0.0, -1.0)
        out[:, :, k] = map_coordinates(dose, index.reshape(-1, 3).T, order=1, mode="constant", cval=0.0,
                                       prefilter=False).reshape(i.shape)
    if not np.isfinite(out).all() or out.min() < 0:
        raise input_error(path, "the dose holds negative or non-finite values")
    return out


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def read_dicom_patient(folder: Path, aliases: Aliases | None = None) -> DicomPatient:
    """A patient folder -> its CT (HU), structures and dose (Gy) on the CT's grid, with the
    DICOM identity (`dicom_*` attributes) that a predicted RT Dose needs."""
    folder = Path(folder)
    files = _by_modality(folder)
    grid, ct, first = read_ct(folder, files.get("CT", []))
    frame = _text(first.get("FrameOfReferenceUID"))
    struct = _one(folder, files, "RTSTRUCT", required=True)
    assert struct is not None  # required
    struct_path, struct_ds = struct
    referenced = {_text(item.get("FrameOfReferenceUID"))
                  for item in struct_ds.get("ReferencedFrameOfReferenceSequence", [])}
    if frame and referenced and frame not in referenced:
        raise input_error(struct_path, f"its frame of reference is not the CT's ({frame})")
    check_names(folder, [folder], aliases or {}, names=lambda _: list(_roi_names(struct_ds).values()))
    structures = read_structures(struct_path, _read(struct_path, pixels=True), grid, aliases or {})
    dose_file = _one(folder, files, "RTDOSE", required=False)
    dose = None
    plan = ""
    if dose_file is not None:
        dose_path, dose_ds = dose_file
        if frame and _text(dose_ds.get("FrameOfReferenceUID")) not in ("", frame):
            raise input_error(dose_path, f"its frame of reference is not the CT's ({frame})")
        dose = read_dose(dose_path, grid)
        plan = next((_text(item.get("ReferencedSOPInstanceUID"))
                     for item in dose_ds.get("ReferencedRTPlanSequence", [])), "")
    plan_file = _one(folder, files, "RTPLAN", required=False)
    if plan_file is not None:
        plan = _text(plan_file[1].get("SOPInstanceUID"))
    attrs = {ATTR_PREFIX + key: _text(first.get(key)) for key in IDENTITY}
    attrs.update({f"{ATTR_PREFIX}StructureSetUID": _text(struct_ds.get("SOPInstanceUID")),
                  f"{ATTR_PREFIX}PlanUID": plan})
    return DicomPatient(folder.name, grid, ct, structures, dose, attrs)


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def new_dataset(sop_class: str, modality: str, identity: dict[str, str]) -> Dataset:
    """A dataset of `sop_class` in the patient's study (`identity`: IDENTITY keywords), with file
    meta, a new SOP instance and a new series."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, generate_uid())
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    for key in IDENTITY:
        setattr(ds, key, identity.get(key, ""))
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    now = datetime.now(timezone.utc)
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.Manufacturer = "nasdose"
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def set_geometry(ds: Dataset, grid: Grid) -> None:
    """The image plane attributes of a grid (its first slice)."""
    ds.ImagePositionPatient = [f"{x:.6g}" for x in grid.origin]
    ds.ImageOrientationPatient = [f"{x:.8g}" for x in grid.direction[:, :2].T.ravel()]
    ds.PixelSpacing = [f"{grid.spacing[1]:.6g}", f"{grid.spacing[0]:.6g}"]
    ds.Columns, ds.Rows = grid.shape[0], grid.shape[1]


def save(path: Path, ds: Dataset) -> None:
    """A dataset as a DICOM file (preamble, file meta), written atomically."""
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def rt_dose(dose_gy: np.ndarray, grid: Grid, identity: dict[str, str], *, plan_uid: str = "",
            description: str = "nasdose predicted dose") -> Dataset:
    """A dose (Gy, indexed i, j, k on `grid`) as an RT Dose dataset: 32-bit unsigned pixels scaled
    by DoseGridScaling, frames along the slice normal, a PLAN dose referencing `plan_uid` when
    there is one."""
    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.shape != grid.shape:
        raise NasDoseError(f"a dose of shape {dose.shape} on a grid of shape {grid.shape}")
    if not np.isfinite(dose).all() or dose.min() < 0:
        raise NasDoseError("a dose with negative or non-finite values cannot be written as RT Dose")
    top = float(dose.max())
    # DS holds 16 characters: the pixels are scaled by the scaling as written
    scaling = float(f"{top / np.iinfo(np.uint32).max:.10g}") if top > 0 else 1.0
    pixels = np.rint(dose / scaling).clip(0, np.iinfo(np.uint32).max).astype(np.uint32)
    ds = new_dataset(RT_DOSE_STORAGE, "RTDOSE", identity)
    ds.SeriesDescription = description
    set_geometry(ds, grid)
    ds.SliceThickness = f"{grid.spacing[2]:.6g}"
    ds.NumberOfFrames = grid.shape[2]
    ds.FrameIncrementPointer = pydicom.tag.Tag("GridFrameOffsetVector")
    ds.GridFrameOffsetVector = [f"{k * grid.spacing[2]:.6g}" for k in range(grid.shape[2])]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = f"{scaling:.10g}"
    if plan_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"  # RT Plan Storage
        ref.ReferencedSOPInstanceUID = plan_uid
        ds.ReferencedRTPlanSequence = DicomSequence([ref])
    ds.PixelData = np.ascontiguousarray(pixels.transpose(2, 1, 0)).astype("<u4").tobytes()
    return ds


def identity(attrs: dict[str, Any]) -> dict[str, str]:
    """The IDENTITY keywords of a patient's `dicom_*` attributes."""
    return {key: str(attrs.get(ATTR_PREFIX + key, "")) for key in IDENTITY}


def require_dicom(pid: str, attrs: dict[str, Any], where: Callable[[], str]) -> None:
    """A patient's dose can go to RT Dose only when it came from DICOM (its study and frame)."""
    if not attrs.get(ATTR_PREFIX + "FrameOfReferenceUID"):
        raise NasDoseError(f"{where()}: patient {pid} was not imported from DICOM: no CT to align an RT Dose "
                           "with (use --format csv or nifti)")
