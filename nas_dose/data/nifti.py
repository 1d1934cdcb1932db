"""NIfTI patients: one folder each, read onto nasdose's cubic grid; doses written back on the
files' own grid, with their affine.

A folder holds ct.nii.gz (HU), one mask per structure (<ROI>.nii.gz, or another name mapped to
an ROI by an alias table) and/or a label map (labels.nii.gz with labels.json: label -> name),
and optionally dose.nii.gz (Gy) and possible_dose_mask.nii.gz (else the body). The volumes may
have any shape, voxel size and orientation: nas_dose.data.geometry takes them onto the internal
cube (exactly, when they are such a cube already) and keeps their grid for the way back.
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from ..errors import NasDoseError, input_error
from ..io import atomic_path, load_yaml
from .geometry import OPENKBP_DIRECTION, Geometry, dose_on_original, original_geometry, patient_from_volumes
from .patient import ROIS, Patient

SUFFIXES = (".nii.gz", ".nii")
CT, DOSE, MASK, LABELS = "ct", "dose", "possible_dose_mask", "labels"
LABEL_NAMES = "labels.json"
ALIAS_FILES = ("aliases.yaml", "aliases.yml", "aliases.json")
Aliases = Mapping[str, "str | None"]


def _stem(path: Path) -> str | None:
    """A NIfTI file's name without its suffix (None for any other file)."""
    for suffix in SUFFIXES:
        if path.name.endswith(suffix) and not path.name.startswith("."):
            return path.name[:-len(suffix)]
    return None


def nifti_file(folder: Path, name: str) -> Path | None:
    """`folder/name.nii.gz` (or .nii) when it exists."""
    return next((folder / f"{name}{s}" for s in SUFFIXES if (folder / f"{name}{s}").is_file()), None)


def is_nifti_patient(path: Path) -> bool:
    """A patient folder of the NIfTI layout: it holds ct.nii.gz."""
    return path.is_dir() and not path.name.startswith(".") and nifti_file(path, CT) is not None


def load_aliases(path: Path) -> dict[str, str | None]:
    """An alias table (YAML or JSON: other name -> ROI, or null to skip that structure), keyed
    by lower-case name as every structure name is matched."""
    table = load_yaml(path)
    if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
        raise input_error(path, "expected a mapping of structure names to ROI names (or null)")
    bad = sorted(f"{k}: {v}" for k, v in table.items() if v is not None and v not in ROIS)
    if bad:
        raise input_error(path, f"not ROI names: {', '.join(bad)} (ROIs: {', '.join(ROIS)}, or null to skip)")
    return {k.lower(): v for k, v in table.items()}


def find_aliases(*folders: Path) -> dict[str, str | None]:
    """The alias table of the first folder holding aliases.yaml (or .yml, .json); none: empty."""
    for folder in folders:
        for name in ALIAS_FILES:
            if (folder / name).is_file():
                return load_aliases(folder / name)
    return {}


def _label_names(folder: Path) -> dict[int, str]:
    """labels.json: {"1": "PTV70", ...}, the structure name of each label of labels.nii.gz."""
    path = folder / LABEL_NAMES
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise input_error(folder, f"a label map needs {LABEL_NAMES} (label -> structure name)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise input_error(path, f"not readable JSON ({type(e).__name__})") from None
    if not isinstance(table, dict) or not all(isinstance(k, str) and k.isdigit() and int(k) > 0
                                              and isinstance(v, str) for k, v in table.items()):
        raise input_error(path, 'expected {"label": "structure name", ...} with labels from 1')
    return {int(k): v for k, v in table.items()}


def structure_names(folder: Path) -> list[str]:
    """The names of a patient's structures as found: mask file names, then label names."""
    names = sorted(stem for f in folder.iterdir() if (stem := _stem(f)) is not None
                   and stem not in (CT, DOSE, MASK, LABELS))
    if nifti_file(folder, LABELS) is not None:
        names += _label_names(folder).values()
    return names


def roi_name(name: str, aliases: Aliases) -> str | None:
    """The ROI a structure name means (None: skipped); KeyError when it means nothing."""
    key = name.lower()
    if key in aliases:
        return aliases[key]
    return {roi.lower(): roi for roi in ROIS}[key]


def check_names(where: Path, folders: list[Path], aliases: Aliases,
                names: Callable[[Path], list[str]] = structure_names) -> None:
    """Every structure name of every patient (`names` of its folder: NIfTI's by default) maps to
    an ROI (or is skipped); else one error listing the unmapped names and the patients with them,
    before anything is read."""
    unmapped: dict[str, list[str]] = {}
    for folder in folders:
        for name in names(folder):
            try:
                roi_name(name, aliases)
            except KeyError:
                unmapped.setdefault(name, []).append(folder.name)
    if unmapped:
        listed = "; ".join(f"{name} ({', '.join(pids[:3])}{', ...' if len(pids) > 3 else ''})"
                           for name, pids in sorted(unmapped.items()))
        raise input_error(where, f"structure names not in the ROI vocabulary or the alias table: {listed}; map them "
                                 f"to one of {', '.join(ROIS)} (or null to skip) in aliases.yaml or --aliases FILE")


def _image(path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as e:
        raise input_error(path, f"not a readable NIfTI file ({type(e).__name__})") from None
    if not isinstance(image, nib.Nifti1Image):
        raise input_error(path, f"not a NIfTI image ({type(image).__name__})")
    if len(image.shape) != 3:
        raise input_error(path, f"expected a 3-D volume, got shape {image.shape}")
    return image


def _data(image: nib.Nifti1Image, path: Path, dtype: type | None) -> np.ndarray:
    """The voxels as stored (`dtype` None) or scaled to floats, checked finite."""
    try:
        data = np.asanyarray(image.dataobj) if dtype is None else image.get_fdata(dtype=dtype)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise input_error(path, f"cannot read the voxels ({type(e).__name__})") from None
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise input_error(path, "holds NaN or infinite values")
    return data


class _Reader:
    """A patient folder's files, as stored, each checked to be on the CT's voxel grid."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ct_path = nifti_file(folder, CT) or folder / f"{CT}.nii.gz"
        self.image = _image(self.ct_path)
        self.affine = np.asarray(self.image.affine, dtype=np.float64)
        try:
            self.geometry = Geometry.from_ras_affine(self.affine, self.image.shape)
        except ValueError as e:
            raise input_error(self.ct_path, f"unusable affine: {e}") from None

    def read(self, path: Path, dtype: type | None = None) -> np.ndarray:
        image = self.image if path == self.ct_path else _image(path)
        if image.shape != self.image.shape or not np.allclose(image.affine, self.affine, atol=1e-4):
            raise input_error(path, f"its voxel grid (shape, affine) differs from {self.ct_path.name}'s")
        return _data(image, path, dtype)


def _structures(reader: _Reader, aliases: Aliases) -> dict[str, np.ndarray]:
    """Masks keyed by ROI, from mask files and the label map; an ROI found twice is an error."""
    folder = reader.folder
    check_names(folder, [folder], aliases)
    found: dict[str, tuple[str, np.ndarray]] = {}

    def add(name: str, mask: np.ndarray) -> None:
        roi = roi_name(name, aliases)
        if roi is None:
            return
        if roi in found:
            raise input_error(folder, f"{found[roi][0]} and {name} are both {roi}")
        found[roi] = (name, mask)

    for path in sorted(folder.iterdir()):
        stem = _stem(path)
        if stem is not None and stem not in (CT, DOSE, MASK, LABELS):
            add(stem, reader.read(path) != 0)
    labels_path = nifti_file(folder, LABELS)
    if labels_path is not None:
        names = _label_names(folder)
        labels = reader.read(labels_path)
        unnamed = sorted(set(np.unique(labels).tolist()) - {0} - set(names))
        if unnamed:
            raise input_error(labels_path, f"labels {unnamed} have no name in {LABEL_NAMES}")
        for label, name in names.items():
            if (labels == label).any():  # labels.json may name structures a patient lacks
                add(name, labels == label)
    return {roi: found[roi][1] for roi in ROIS if roi in found}


def read_nifti_patient(folder: Path, *, split: str = "train", aliases: Aliases | None = None, grid: int = 1,
                       spacing: float | None = None) -> Patient:
    """A patient from a NIfTI folder on its internal cubic grid, a multiple of `grid` voxels a side
    (nas_dose.data.geometry.internal_geometry: reoriented only when the volume is such a cube
    along the patient's axes and `spacing` is None, else resampled to `spacing` mm), the files'
    own grid in `attrs`."""
    folder = Path(folder)
    if not is_nifti_patient(folder):
        raise input_error(folder, f"no {CT}.nii.gz")
    reader = _Reader(folder)
    dose_path, mask_path = nifti_file(folder, DOSE), nifti_file(folder, MASK)
    return patient_from_volumes(
        folder.name, reader.read(reader.ct_path, np.float64), _structures(reader, aliases or {}),
        reader.read(dose_path, np.float32) if dose_path else None, reader.geometry, grid=grid, spacing=spacing,
        possible_dose_mask=reader.read(mask_path) != 0 if mask_path else None,
        attrs={"source": str(folder), "split": split})


def openkbp_geometry(shape: tuple[int, ...], voxel_mm: tuple[float, float, float] | list[float]) -> Geometry:
    """The grid of an array in OpenKBP axis order without a recorded geometry (an OpenKBP or
    synthetic patient): what its dose is written with, the first voxel at the origin."""
    return Geometry(shape=(int(shape[0]), int(shape[1]), int(shape[2])),
                    spacing=(float(voxel_mm[0]), float(voxel_mm[1]), float(voxel_mm[2])),
                    origin=(0.0, 0.0, 0.0), direction=OPENKBP_DIRECTION)


def write_nifti_dose(path: Path, dose: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """A dose (Gy, on the patient's internal source grid) as a float32 .nii.gz on the grid of the
    patient's original files, with their affine (`dose_on_original`; a patient without one gets
    `openkbp_geometry`), written atomically."""
    path = Path(path)
    dose = np.asarray(dose, dtype=np.float32)
    if not np.isfinite(dose).all():
        raise input_error(path, "the dose holds NaN or infinite values")
    if original_geometry(attrs) is not None:
        dose, geometry = dose_on_original(attrs, dose)
    elif "voxel_mm" in attrs:
        geometry = openkbp_geometry(dose.shape, attrs["voxel_mm"])
    else:
        raise NasDoseError("a patient with neither an original geometry nor a voxel size cannot be written as NIfTI")
    image = nib.Nifti1Image(np.ascontiguousarray(dose), geometry.ras_affine())
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"nasdose predicted dose (Gy)"
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))
