"""DICOM RT patients: a CT series, its RTSTRUCT and an optional RT Dose read as stored and from
there onto nasdose's cube; predicted doses written back as RT Dose files aligned with that CT.

A patient is one folder holding its DICOM files (any names; an RTPLAN only lends its UID, other
modalities are ignored). The CT's volumes are arrays indexed (i, j, k) = (column, row, slice),
described by a `Geometry` (LPS): its direction's columns are ImageOrientationPatient's row and
column cosines and their cross product, the slice normal, along which the slices are sorted.
Contours are rasterised onto the CT's slices with matplotlib's point-in-polygon test (pixel
centres inside; the contours of one structure on one slice combine by exclusive or, so an inner
contour is a hole, as dicompyler and planning systems read them). The RT Dose stays on its own
grid until nas_dose.data.geometry takes it onto the cube (trilinear, 0 outside it). An ROI of
RTROIInterpretedType EXTERNAL (the body outline) is the possible-dose mask; without one it is
the body found in the CT, as for NIfTI.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    RTDoseStorage,
    RTPlanStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from ..errors import NasDoseError, input_error
from ..io import atomic_path
from .geometry import Geometry, dose_on_original, patient_from_volumes
from .nifti import Aliases, check_names, roi_name
from .patient import Patient

TOLERANCE_MM = 1e-3  # positions closer than this are the same (DICOM writes decimal strings)
# The patient's DICOM identity, kept in the data set (as dicom_<keyword>) so that a predicted RT
# Dose joins the patient's study and frame of reference.
IDENTITY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
            "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID")
PREFIX = "dicom_"
PLAN_UID, STRUCTURE_SET_UID = PREFIX + "PlanUID", PREFIX + "StructureSetUID"
Files = dict[str, list[tuple[Path, Dataset]]]


@dataclass
class DicomVolumes:
    """One patient as its files hold it: on the CT's grid (`geometry`) the CT in HU, masks keyed
    by ROI and the EXTERNAL outline (None without one); the dose in Gy on its own grid (None
    without a plan); identity attributes."""

    geometry: Geometry
    ct_hu: np.ndarray
    structures: dict[str, np.ndarray]
    external: np.ndarray | None
    dose_gy: np.ndarray | None
    dose_geometry: Geometry | None
    attrs: dict[str, str]


def _dicom_files(folder: Path) -> Iterator[Path]:
    return (f for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".") and is_dicom(f))


def is_dicom_patient(path: Path) -> bool:
    """A patient folder of the DICOM layout: it holds DICOM files (with the DICM preamble)."""
    return path.is_dir() and not path.name.startswith(".") and next(_dicom_files(path), None) is not None


def _read(path: Path, pixels: bool = False) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as e:
        raise input_error(path, f"not a readable DICOM file ({type(e).__name__})") from None


def _by_modality(folder: Path) -> Files:
    found: Files = {}
    for path in _dicom_files(folder):
        ds = _read(path)
        found.setdefault(str(ds.get("Modality", "")), []).append((path, ds))
    return found


def _one(folder: Path, files: Files, modality: str) -> tuple[Path, Dataset] | None:
    """The patient's file of `modality` (None without one); more than one is an error."""
    found = files.get(modality, [])
    if len(found) > 1:
        raise input_error(folder, f"{len(found)} {modality} files ({', '.join(p.name for p, _ in found[:4])}); "
                                  "keep the one that goes with the CT")
    return found[0] if found else None


def _structure_set(folder: Path, files: Files) -> tuple[Path, Dataset]:
    found = _one(folder, files, "RTSTRUCT")
    if found is None:
        raise input_error(folder, "no RTSTRUCT file: nasdose needs the structures")
    return found


def _external(ds: Dataset) -> set[int]:
    """The ROI numbers of the body outline (RTROIInterpretedType EXTERNAL)."""
    return {int(item.ReferencedROINumber) for item in ds.get("RTROIObservationsSequence", [])
            if str(item.get("RTROIInterpretedType", "")).upper() == "EXTERNAL"}


def _roi_names(ds: Dataset) -> dict[int, str]:
    """ROI number -> name, but for the EXTERNAL outline (the possible-dose mask, not an ROI)."""
    external = _external(ds)
    return {int(item.ROINumber): str(item.ROIName).strip() for item in ds.get("StructureSetROISequence", [])
            if int(item.ROINumber) not in external}


def structure_names(folder: Path) -> list[str]:
    """The ROI names of a patient folder's RTSTRUCT (but its EXTERNAL outline)."""
    return sorted(_roi_names(_structure_set(folder, _by_modality(folder))[1]).values())


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


def _geometry(shape: tuple[int, int, int], spacing: Sequence[float], origin: np.ndarray,
              direction: np.ndarray) -> Geometry:
    return Geometry(shape=shape, spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
                    origin=(float(origin[0]), float(origin[1]), float(origin[2])),
                    direction=tuple(float(v) for v in direction.ravel()))


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except (AttributeError, ValueError, RuntimeError, NotImplementedError) as e:
        raise input_error(path, f"cannot read the pixels ({type(e).__name__}: {e})") from None


def _step(offsets: np.ndarray, path: Path, what: str) -> float:
    """The common step of sorted slice offsets (mm); an error unless they are evenly spaced."""
    steps = np.diff(offsets)
    if len(steps) == 0:
        raise input_error(path, f"{what}: a single slice; a volume needs two or more")
    if steps.min() < TOLERANCE_MM:
        raise input_error(path, f"{what}: two slices at the same position")
    if steps.max() - steps.min() > 0.01 * steps.mean() + TOLERANCE_MM:
        raise input_error(path, f"{what}: slices are not evenly spaced (steps {steps.min():g} to {steps.max():g} mm)")
    return float((offsets[-1] - offsets[0]) / len(steps))


def read_ct(folder: Path, slices: Sequence[tuple[Path, Dataset]]) -> tuple[Geometry, np.ndarray]:
    """A CT series -> its grid and HU volume (i, j, k; float32), slices sorted along the normal."""
    if not slices:
        raise input_error(folder, "no CT slices")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise input_error(folder, f"{len(series)} CT series; keep one per patient folder")
    path0, ds0 = slices[0]
    direction = _direction(ds0, path0)
    rows, columns = int(ds0.Rows), int(ds0.Columns)
    pixel_mm = _floats(ds0, "PixelSpacing", 2, path0)  # between rows (along j), between columns (i)
    positions = []
    for path, ds in slices:
        if (int(ds.Rows), int(ds.Columns)) != (rows, columns):
            raise input_error(path, f"{ds.Rows}x{ds.Columns} pixels, other slices {rows}x{columns}")
        if not np.allclose(_direction(ds, path), direction, atol=1e-4) or \
                not np.allclose(_floats(ds, "PixelSpacing", 2, path), pixel_mm, atol=TOLERANCE_MM):
            raise input_error(path, "orientation or pixel spacing differs from the other slices")
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))
    offsets = np.array(positions) @ direction[:, 2]
    order = np.argsort(offsets)
    origin = positions[order[0]]
    for n in order:
        if np.abs((positions[n] - origin) @ direction[:, :2]).max() > 0.01:
            raise input_error(slices[n][0], "slice not on the first one's normal (a tilted gantry?); "
                                            "resample the series to a regular grid first")
    step = _step(offsets[order], folder, "CT")
    volume = np.empty((columns, rows, len(slices)), dtype=np.float32)
    for k, n in enumerate(order):
        path = slices[n][0]
        ds = _read(path, pixels=True)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        volume[:, :, k] = (_pixels(ds, path).astype(np.float64) * slope + intercept).T
    return _geometry((columns, rows, len(slices)), (pixel_mm[1], pixel_mm[0], step), origin, direction), volume


def _rasterise(contours: list[np.ndarray], geometry: Geometry) -> np.ndarray:
    """Closed planar contours (LPS points, n x 3) as a mask on the grid: per slice, the exclusive
    or of the polygons' insides (pixel centres)."""
    mask = np.zeros(geometry.shape, dtype=bool)
    to_index = np.linalg.inv(geometry.affine())
    size = np.array(geometry.shape[:2])
    for points in contours:
        index = points @ to_index[:3, :3].T + to_index[:3, 3]  # continuous voxel indices
        k = int(round(float(index[:, 2].mean())))
        lo = np.clip(np.floor(index[:, :2].min(axis=0)).astype(int), 0, None)
        hi = np.minimum(np.ceil(index[:, :2].max(axis=0)).astype(int), size - 1)
        if not 0 <= k < geometry.shape[2] or (hi < lo).any():
            continue  # outside the CT
        i, j = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
        inside = Polygon(index[:, :2]).contains_points(np.stack([i.ravel(), j.ravel()], axis=1))
        mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, k] ^= inside.reshape(i.shape)
    return mask


def _contours(path: Path, name: str, item: Dataset) -> list[np.ndarray]:
    """An ROI's closed planar contours as (n, 3) arrays of LPS points (other types are skipped)."""
    found = []
    for contour in item.get("ContourSequence", []):
        if str(contour.get("ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
            continue
        data = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64)
        if data.size < 9 or data.size % 3:
            raise input_error(path, f"{name}: a contour of {data.size} numbers, not 3 or more points")
        found.append(data.reshape(-1, 3))
    return found


def read_structures(path: Path, ds: Dataset, geometry: Geometry,
                    aliases: Aliases) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """An RTSTRUCT's contours rasterised onto the grid: masks keyed by ROI (names mapped by
    `roi_name`; skipped names and ROIs without contours left out), and the EXTERNAL outline."""
    names, external = _roi_names(ds), _external(ds)
    found: dict[str, tuple[str, np.ndarray]] = {}
    body = None
    for item in ds.get("ROIContourSequence", []):
        number = int(item.ReferencedROINumber)
        if number in external:
            body = _rasterise(_contours(path, "EXTERNAL", item), geometry)
            continue
        if number not in names:
            raise input_error(path, f"contours of ROI number {number}, which the StructureSetROISequence lacks")
        name = names[number]
        roi, contours = roi_name(name, aliases), _contours(path, name, item)
        if roi is None or not contours:
            continue
        if roi in found:
            raise input_error(path, f"{found[roi][0]} and {name} are both {roi}")
        found[roi] = (name, _rasterise(contours, geometry))
    return {roi: mask for roi, (_, mask) in found.items()}, body


def read_dose(path: Path) -> tuple[np.ndarray, Geometry]:
    """An RT Dose (Gy) and its grid, indexed (column, row, frame). Frames run along the normal,
    GridFrameOffsetVector relative to the first (or absolute, starting at its position)."""
    ds = _read(path, pixels=True)
    units = str(ds.get("DoseUnits", "")).upper()
    if units != "GY":
        raise input_error(path, f"DoseUnits {units or 'missing'}: nasdose reads absolute doses in GY only")
    frames = int(ds.get("NumberOfFrames", 1))
    offsets = _floats(ds, "GridFrameOffsetVector", frames, path)
    pixel_mm = _floats(ds, "PixelSpacing", 2, path)
    grid = _geometry((int(ds.Columns), int(ds.Rows), frames),
                     (pixel_mm[1], pixel_mm[0], _step(offsets - offsets[0], path, "RT Dose")),
                     _floats(ds, "ImagePositionPatient", 3, path), _direction(ds, path))
    pixels = _pixels(ds, path).reshape(frames, grid.shape[1], grid.shape[0])
    dose = pixels.transpose(2, 1, 0).astype(np.float32) * np.float32(ds.get("DoseGridScaling", 1.0))
    if not np.isfinite(dose).all() or dose.min() < 0:
        raise input_error(path, "the dose holds negative or non-finite values")
    return dose, grid


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def read_dicom_volumes(folder: Path, aliases: Aliases | None = None) -> DicomVolumes:
    """A patient folder's CT (HU), structures and dose (Gy) on the CT's grid, and the identity
    (`dicom_*`) that a predicted RT Dose needs."""
    folder = Path(folder)
    files = _by_modality(folder)
    geometry, ct = read_ct(folder, files.get("CT", []))
    first = files["CT"][0][1]
    frame = _text(first.get("FrameOfReferenceUID"))
    struct_path, struct_ds = _structure_set(folder, files)
    referenced = {_text(item.get("FrameOfReferenceUID"))
                  for item in struct_ds.get("ReferencedFrameOfReferenceSequence", [])}
    if frame and referenced and frame not in referenced:
        raise input_error(struct_path, f"its frame of reference is not the CT's ({frame})")
    check_names(folder, [folder], aliases or {}, names=lambda _: list(_roi_names(struct_ds).values()))
    structures, body = read_structures(struct_path, _read(struct_path, pixels=True), geometry, aliases or {})
    attrs = {PREFIX + key: _text(first.get(key)) for key in IDENTITY}
    attrs[STRUCTURE_SET_UID] = _text(struct_ds.get("SOPInstanceUID"))
    attrs[PLAN_UID] = ""
    dose, dose_geometry = None, None
    dose_file = _one(folder, files, "RTDOSE")
    if dose_file is not None:
        dose_path, dose_ds = dose_file
        if frame and _text(dose_ds.get("FrameOfReferenceUID")) not in ("", frame):
            raise input_error(dose_path, f"its frame of reference is not the CT's ({frame})")
        dose, dose_geometry = read_dose(dose_path)
        attrs[PLAN_UID] = next((_text(item.get("ReferencedSOPInstanceUID"))
                                for item in dose_ds.get("ReferencedRTPlanSequence", [])), "")
    plan = _one(folder, files, "RTPLAN")
    if plan is not None:
        attrs[PLAN_UID] = _text(plan[1].get("SOPInstanceUID"))
    return DicomVolumes(geometry, ct, structures, body, dose, dose_geometry, attrs)


def read_dicom_patient(folder: Path, *, split: str = "train", aliases: Aliases | None = None, grid: int = 1,
                       spacing: float | None = None) -> Patient:
    """A patient from a DICOM folder on its internal cubic grid (nas_dose.data.geometry
    .patient_from_volumes), with the CT's grid and the DICOM identity in `attrs`."""
    v = read_dicom_volumes(folder, aliases)
    return patient_from_volumes(Path(folder).name, v.ct_hu, v.structures, v.dose_gy, v.geometry, grid=grid,
                                spacing=spacing, possible_dose_mask=v.external, dose_geometry=v.dose_geometry,
                                attrs={"source": str(folder), "split": split, **v.attrs})


def _ds(value: float) -> str:
    """A number as a DICOM decimal string (at most 16 characters, as exact as they allow)."""
    return format_number_as_ds(float(value))


def new_dataset(sop_class: UID, modality: str, identity: Mapping[str, str]) -> Dataset:
    """A dataset of `sop_class` in the patient's study (`identity`: IDENTITY keywords), with
    file meta, a new SOP instance in a new series."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    for key in IDENTITY:
        setattr(ds, key, identity.get(key, ""))
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = ds.InstanceNumber = 1
    now = datetime.now(timezone.utc)
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.Manufacturer = "nasdose"
    return ds


def set_geometry(ds: Dataset, geometry: Geometry, k: int = 0) -> None:
    """The image plane attributes of slice `k` of a grid whose axes are (column, row, slice)."""
    position = geometry.affine() @ np.array([0.0, 0.0, k, 1.0])
    ds.ImagePositionPatient = [_ds(x) for x in position[:3]]
    ds.ImageOrientationPatient = [_ds(x) for x in geometry.matrix()[:, :2].T.ravel()]
    ds.PixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[0])]
    ds.Columns, ds.Rows = geometry.shape[0], geometry.shape[1]


def save(path: Path, ds: Dataset) -> None:
    """A dataset as a DICOM file (preamble, file meta), written atomically."""
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def rt_dose(dose_gy: np.ndarray, geometry: Geometry, identity: Mapping[str, str], *, plan_uid: str = "",
            description: str = "nasdose predicted dose") -> Dataset:
    """A dose (Gy, indexed (column, row, slice) on `geometry`) as an RT Dose: 32-bit unsigned
    pixels times DoseGridScaling, frames along the slice normal, a physical PLAN dose that
    references its plan where there is one."""
    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.shape != geometry.shape:
        raise NasDoseError(f"a dose of shape {dose.shape} on a grid of shape {geometry.shape}")
    if not np.isfinite(dose).all() or dose.min() < 0:
        raise NasDoseError("a dose with negative or non-finite values cannot be written as RT Dose")
    top = np.iinfo(np.uint32).max
    scaling = float(_ds(dose.max() / top)) if dose.max() > 0 else 1.0  # the pixels use the scaling as written
    ds = new_dataset(RTDoseStorage, "RTDOSE", identity)
    ds.SeriesDescription = description
    set_geometry(ds, geometry)
    ds.SliceThickness = _ds(geometry.spacing[2])
    ds.NumberOfFrames = geometry.shape[2]
    ds.FrameIncrementPointer = Tag("GridFrameOffsetVector")
    ds.GridFrameOffsetVector = [_ds(k * geometry.spacing[2]) for k in range(geometry.shape[2])]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    ds.DoseGridScaling = _ds(scaling)
    if plan_uid:
        plan = Dataset()
        plan.ReferencedSOPClassUID, plan.ReferencedSOPInstanceUID = RTPlanStorage, plan_uid
        ds.ReferencedRTPlanSequence = DicomSequence([plan])
    pixels = np.rint(dose / scaling).clip(0, top).astype("<u4")
    ds.PixelData = np.ascontiguousarray(pixels.transpose(2, 1, 0)).tobytes()
    return ds


def from_dicom(attrs: Mapping[str, Any]) -> bool:
    """Whether a patient (its data set attributes) was imported from DICOM: has a CT to align with."""
    return bool(attrs.get(PREFIX + "FrameOfReferenceUID"))


def write_dicom_dose(path: Path, dose: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """A predicted dose (Gy, on the patient's internal source grid) as an RT Dose on the grid of
    the patient's CT, in its study and frame of reference, written atomically."""
    if not from_dicom(attrs):
        raise NasDoseError(f"{path}: the patient was not imported from DICOM: no CT to align an RT Dose with")
    on_ct, geometry = dose_on_original(attrs, np.asarray(dose, dtype=np.float32))
    identity = {key: str(attrs.get(PREFIX + key, "")) for key in IDENTITY}
    save(path, rt_dose(on_ct, geometry, identity, plan_uid=str(attrs.get(PLAN_UID, ""))))
