"""Read OpenKBP patients from either of the challenge's layouts, and its sparse CSV format.

The CSV layout is the challenge's own (`pt_N/ct.csv`, one sparse file per array); the npz layout
is the same data densified. Both readers return identical `Patient`s, so nothing downstream
needs to know which layout a data set came from.
"""
from __future__ import annotations

import math
import re
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import input_error
from ..io import atomic_path
from .dicom import is_dicom_patient, read_dicom_patient
from .dicom import structure_names as dicom_structure_names
from .nifti import check_names, find_aliases, is_nifti_patient, load_aliases, read_nifti_patient
from .nifti import structure_names as nifti_structure_names
from .patient import CT_STORED_RANGE, OPENKBP_GRID, ROIS, Patient

Layout = Literal["csv", "npz", "nifti", "dicom"]
Shape = tuple[int, int, int]
OPENKBP_SHAPE: Shape = (OPENKBP_GRID,) * 3
# Split folders of the two layouts, mapped to the split names used everywhere in nasdose.
SPLIT_FOLDERS: dict[str, str] = {
    "train-pats": "train", "validation-pats": "validation", "test-pats": "test",
    "train": "train", "validation": "validation", "test": "test", "unlabeled": "unlabeled",
}
CSV_HEADER = ",data"


@dataclass
class PatientSource:
    """Where one patient's files are, before anything is read."""

    id: str
    path: Path
    layout: Layout
    split: str
    aliases: Mapping[str, str | None] = field(default_factory=dict)  # NIfTI/DICOM structure name -> ROI


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders numbers by value, so pt_2 comes before pt_10."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", text) if part)


def _is_csv_patient(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and any(path.glob("*.csv"))


def _is_npz_patient(path: Path) -> bool:
    return path.is_file() and path.suffix == ".npz" and not path.name.startswith(".")


def _patients_in(folder: Path, split: str) -> list[PatientSource]:
    found = []
    for child in folder.iterdir():
        if is_nifti_patient(child):
            found.append(PatientSource(child.name, child, "nifti", split))
        elif is_dicom_patient(child):
            found.append(PatientSource(child.name, child, "dicom", split))
        elif _is_csv_patient(child):
            found.append(PatientSource(child.name, child, "csv", split))
        elif _is_npz_patient(child):
            found.append(PatientSource(child.stem, child, "npz", split))
    return found


def discover(src: Path, aliases: Path | None = None) -> list[PatientSource]:
    """The patients of an OpenKBP tree (split folders), a folder of patients, or one patient; the
    same for NIfTI and DICOM patient folders (nas_dose.data.nifti, .dicom), whose structure names
    are checked here, against `aliases` or the aliases.yaml found in `src` (or, for one patient,
    its parent).

    The split comes from the enclosing folder's name (train-pats, validation, ...); patients
    outside any split folder are training patients.
    """
    src = Path(src)
    if not src.exists():
        raise input_error(src, "not found")
    split = SPLIT_FOLDERS.get(src.parent.name, "train")
    if _is_npz_patient(src):
        return [PatientSource(src.stem, src, "npz", split)]
    if not src.is_dir():
        raise input_error(src, "neither a folder nor a .npz file")
    if (src / "ct.csv").is_file():
        return [PatientSource(src.name, src, "csv", split)]
    if is_nifti_patient(src):
        found = [PatientSource(src.name, src, "nifti", split)]
    elif is_dicom_patient(src):
        found = [PatientSource(src.name, src, "dicom", split)]
    else:
        found = _tree(src)
    named = [s for s in found if s.layout in ("nifti", "dicom")]
    if named:
        table = load_aliases(aliases) if aliases is not None else find_aliases(src, src.parent)
        names = {s.path: nifti_structure_names if s.layout == "nifti" else dicom_structure_names for s in named}
        check_names(src, list(names), table, names=lambda folder: names[folder](folder))
        for s in named:
            s.aliases = table
    return found


def _tree(src: Path) -> list[PatientSource]:
    """The patients in a folder's split folders, else in the folder itself, in natural order."""
    split_dirs = [d for d in src.iterdir() if d.is_dir() and d.name in SPLIT_FOLDERS]
    if split_dirs:
        found = [s for d in split_dirs for s in _patients_in(d, SPLIT_FOLDERS[d.name])]
    else:
        found = _patients_in(src, SPLIT_FOLDERS.get(src.name, "train"))
    if not found:
        raise input_error(src, "no OpenKBP patients found (expected pt_N/ CSV folders or pt_N.npz files, NIfTI "
                               "folders holding ct.nii.gz or DICOM folders, directly or in train/validation/test "
                               "folders)")
    found.sort(key=lambda s: (natural_key(s.id), s.split))
    for a, b in zip(found, found[1:]):
        if a.id == b.id:
            raise input_error(src, f"patient {a.id} appears twice ({a.path} and {b.path})")
    return found


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise input_error(path, "file not found") from None
    except UnicodeDecodeError:
        raise input_error(path, "not a text file") from None
    except OSError as e:
        raise input_error(path, f"cannot read ({e.strerror})") from None


def read_sparse_csv(path: Path, shape: Shape = OPENKBP_SHAPE, mask: bool = False) -> np.ndarray:
    """A dense array from the challenge's sparse CSV (`,data` header, `flat_index,value` lines).

    Mask files leave the value empty; a mask is returned as bool, anything else as float32.
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    if not lines or lines[0].strip() != CSV_HEADER:
        raise input_error(path, f"not an OpenKBP sparse CSV (the first line must be '{CSV_HEADER}')")
    size = math.prod(shape)
    indices: list[int] = []
    values: list[float] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        index_text, sep, value_text = line.partition(",")
        try:
            index = int(index_text)
            value = 1.0 if mask and not value_text.strip() else float(value_text)
        except ValueError:
            raise input_error(path, f"line {number}: expected 'flat_index,value', got {line!r}") from None
        if not sep:
            raise input_error(path, f"line {number}: expected 'flat_index,value', got {line!r}")
        if not 0 <= index < size:
            raise input_error(path, f"line {number}: flat index {index} outside 0..{size - 1}")
        if not math.isfinite(value):
            raise input_error(path, f"line {number}: value {value_text.strip()} is not finite")
        indices.append(index)
        values.append(value)
    flat = np.zeros(size, dtype=bool if mask else np.float32)
    flat[np.asarray(indices, dtype=np.int64)] = np.asarray(values) != 0 if mask else values
    return flat.reshape(shape)


def write_submission_csv(path: Path, dose: np.ndarray) -> None:
    """One patient's dose in the challenge's submission format: its non-zero voxels only.

    Values are written as the shortest text that reads back to the same float32, so a round
    trip through `read_submission_csv` is exact.
    """
    path = Path(path)
    dose = np.asarray(dose, dtype=np.float32)
    if dose.ndim != 3:
        raise input_error(path, f"a dose must be a 3-D array, got shape {dose.shape}")
    if not np.isfinite(dose).all():
        raise input_error(path, "the dose holds NaN or infinite values")
    flat = dose.ravel()
    nonzero = np.flatnonzero(flat)
    body = "".join(f"{i},{v!s}\n" for i, v in zip(nonzero.tolist(), flat[nonzero]))
    with atomic_path(path) as tmp:
        tmp.write_text(f"{CSV_HEADER}\n{body}")


def read_submission_csv(path: Path, shape: Shape = OPENKBP_SHAPE) -> np.ndarray:
    """A dose (float32 Gy) from a submission-format CSV."""
    return read_sparse_csv(path, shape)


def _voxel_mm(values: np.ndarray, path: Path) -> tuple[float, float, float]:
    """Three positive voxel sizes, rounded to a micrometre so float32 (npz) and float64 (CSV)
    copies of the same numbers compare equal."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.shape != (3,) or not np.isfinite(values).all() or (values <= 0).any():
        raise input_error(path, f"expected three positive voxel sizes in mm, got {values.tolist()}")
    x, y, z = (round(float(v), 6) for v in values)
    return x, y, z


def _stored_ct(ct: np.ndarray, path: Path) -> np.ndarray:
    ct = np.asarray(ct, dtype=np.float32)
    if not np.isfinite(ct).all():
        raise input_error(path, "the CT holds NaN or infinite values")
    return np.clip(ct, *CT_STORED_RANGE)


def _checked_dose(dose: np.ndarray, path: Path) -> np.ndarray:
    dose = np.asarray(dose, dtype=np.float32)
    if not np.isfinite(dose).all():
        raise input_error(path, "the dose holds NaN or infinite values")
    return dose


def read_csv_patient(folder: Path, *, split: str = "train") -> Patient:
    """A patient from a `pt_N/` folder of sparse CSVs (dose.csv optional, structures if present)."""
    folder = Path(folder)
    for required in ("ct.csv", "possible_dose_mask.csv", "voxel_dimensions.csv"):
        if not (folder / required).is_file():
            raise input_error(folder, f"missing {required}")
    voxel_file = folder / "voxel_dimensions.csv"
    try:
        voxel = np.array([float(t) for t in _read_text(voxel_file).split()])
    except ValueError:
        raise input_error(voxel_file, "expected three numbers") from None
    dose_file = folder / "dose.csv"
    return Patient(
        id=folder.name,
        ct=_stored_ct(read_sparse_csv(folder / "ct.csv"), folder / "ct.csv"),
        possible_dose_mask=read_sparse_csv(folder / "possible_dose_mask.csv", mask=True),
        structures={name: read_sparse_csv(folder / f"{name}.csv", mask=True)
                    for name in ROIS if (folder / f"{name}.csv").is_file()},
        voxel_mm=_voxel_mm(voxel, voxel_file),
        dose=read_sparse_csv(dose_file) if dose_file.is_file() else None,
        attrs={"source": str(folder), "split": split},
    )


def _bool_mask(array: np.ndarray, name: str, path: Path) -> np.ndarray:
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf" or not np.isin(array, (0, 1)).all():
        raise input_error(path, f"array '{name}' is not a mask (dtype {array.dtype}, values other than 0/1)")
    return array != 0


def read_npz_patient(path: Path, *, split: str = "train") -> Patient:
    """A patient from a `pt_N.npz` archive (the CSV layout densified)."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise input_error(path, f"not a readable npz archive ({type(e).__name__})") from None
    for required in ("ct", "possible_dose_mask", "voxel_dimensions_mm"):
        if required not in arrays:
            raise input_error(path, f"missing array '{required}'")
    ct = arrays["ct"]
    if ct.ndim != 3 or len(set(ct.shape)) != 1 or ct.dtype.kind not in "iuf":
        raise input_error(path, f"'ct' must be a cubic 3-D numeric array, got {ct.dtype} {ct.shape}")
    grids = [name for name in ("dose", "possible_dose_mask", *ROIS) if name in arrays]
    for name in grids:
        if arrays[name].shape != ct.shape:
            raise input_error(path, f"array '{name}' has shape {arrays[name].shape}, expected {ct.shape}")
    if "dose" in arrays and arrays["dose"].dtype.kind not in "iuf":
        raise input_error(path, f"'dose' must be numeric, got {arrays['dose'].dtype}")
    return Patient(
        id=path.stem,
        ct=_stored_ct(ct, path),
        possible_dose_mask=_bool_mask(arrays["possible_dose_mask"], "possible_dose_mask", path),
        structures={name: _bool_mask(arrays[name], name, path) for name in ROIS if name in arrays},
        voxel_mm=_voxel_mm(arrays["voxel_dimensions_mm"], path),
        dose=_checked_dose(arrays["dose"], path) if "dose" in arrays else None,
        attrs={"source": str(path), "split": split},
    )


def read_patient(src: PatientSource, *, grid: int = 1, spacing: float | None = None) -> Patient:
    """Read a discovered patient with the reader of its layout; a NIfTI or DICOM one onto a cube that is a
    multiple of `grid` voxels a side (at `spacing` mm when given: nas_dose.data.geometry), an
    OpenKBP one as it is (its 128³ grid; `spacing` is an error)."""
    if src.layout in ("nifti", "dicom"):
        read = read_nifti_patient if src.layout == "nifti" else read_dicom_patient
        return read(src.path, split=src.split, aliases=src.aliases, grid=grid, spacing=spacing)
    if spacing is not None:
        raise input_error(src.path, "an OpenKBP patient is not resampled to a voxel spacing (it is block-"
                                    "downsampled to the grid): import it without --spacing")
    reader = read_csv_patient if src.layout == "csv" else read_npz_patient
    return reader(src.path, split=src.split)
