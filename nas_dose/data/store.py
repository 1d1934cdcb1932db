"""HDF5 data set and prediction files: written atomically, read one patient at a time.

A training run touches each patient many times; chunked, compressed HDF5 lets a loader read
one patient without loading the set, and `DataFile` reopens the file lazily in each process so
torch DataLoader workers never share an HDF5 handle. The layout is in docs/reference/architecture.md.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np

from .. import __version__
from ..errors import input_error
from ..io import atomic_path
from ..progress import progress
from .patient import ROIS, TARGETS, Patient, Plans
from .resample import upsample_dose

# 2: a resampled patient keeps its source-grid arrays in a `source` group (1 kept the mask only).
FORMAT_VERSION = 2
KINDS = ("dataset", "predictions")
SPLITS = ("train", "validation", "test", "unlabeled")
# "unlabeled": patients with CT and contours but no plan (no dose), which only a teacher can
# label: `nasdose distill` learns from them (see nas_dose.distill.teacher).
CHUNK = 32
SOURCE = "source"
# More plans of a patient with their preferences (optional; readers that know nothing of it
# read the rest as before, so the format version stays).
PLANS = "plans"
# More input volumes of every patient (`Patient.extra`), one dataset each, named in the file's
# `extra_channels` attribute (absent: none; older readers ignore them, so the version stays).
EXTRA = "extra"
_EXTRA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """32³ chunks (one per structure for the stacked masks), so one patient decompresses fast."""
    return tuple(1 if len(shape) == 4 and i == 0 else min(CHUNK, n) for i, n in enumerate(shape))


def _put(group: h5py.Group, name: str, array: np.ndarray, dtype: type) -> None:
    array = np.ascontiguousarray(array, dtype=dtype)
    group.create_dataset(name, data=array, chunks=_chunks(array.shape), compression="gzip",
                         shuffle=True)


def _attr_value(key: str, value: Any) -> Any:
    """A value h5py stores as an attribute, or a TypeError (a bug in the caller, not user input)."""
    if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
        return value
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype())
        if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
               for v in value):
            return np.array(value, dtype=np.float64 if any(isinstance(v, (float, np.floating))
                                                           for v in value) else np.int64)
    raise TypeError(f"patient attribute '{key}' of type {type(value).__name__} cannot be stored")


def _write_attrs(group: h5py.Group, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        group.attrs[key] = _attr_value(key, value)


def _plain(value: Any) -> Any:
    """HDF5 attribute values as plain Python (lists, str, int, float)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _root(f: h5py.File, kind: str, grid: int, source: str) -> h5py.Group:
    f.attrs.update({"nasdose_format": kind, "format_version": FORMAT_VERSION, "grid": grid,
                    "source": source, "nasdose_version": __version__})
    return f.create_group("patients", track_order=True)


def _new_group(patients: h5py.Group, pid: str, path: Path) -> h5py.Group:
    if not pid or "/" in pid or pid in (".", ".."):
        raise input_error(path, f"patient id {pid!r} cannot name an HDF5 group")
    if pid in patients:
        raise input_error(path, f"patient {pid} appears twice")
    return patients.create_group(pid)


def write_dataset(path: Path, patients: Iterable[Patient], *, source: str, grid: int,
                  total: int | None = None) -> None:
    """Write patients (each with attrs["split"]) to an HDF5 data set on a `grid`³ grid."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        group = _root(f, "dataset", grid, source)
        extra: list[str] | None = None
        for p in progress(patients, total=total, desc=f"writing {path.name}"):
            names = sorted(p.extra)
            if extra is None:
                extra = names
            elif names != extra:
                raise input_error(path, f"patient {p.id} has extra input channels {names}, the patients before "
                                        f"it {extra}: every patient needs the same ones")
            _write_patient(group, p, grid, path)
        if not len(group):
            raise input_error(path, "no patients to write")
        if extra:
            f.attrs["extra_channels"] = _attr_value("extra_channels", extra)


def _write_patient(patients: h5py.Group, p: Patient, grid: int, path: Path) -> None:
    _check_physical(p, path)
    split = p.attrs.get("split")
    if split not in SPLITS:
        raise input_error(path, f"patient {p.id}: split {split!r} is not one of {', '.join(SPLITS)}")
    g = _new_group(patients, p.id, path)
    _write_attrs(g, {"source": "", "source_grid": grid, "resample_factor": 1, **p.attrs})
    _write_arrays(g, p, grid, path)
    _write_extra(g, p, grid, path)
    if p.plans is not None:
        _write_plans(g, p.id, p.plans, grid, path)
    if p.source is not None:
        _write_arrays(g.create_group(SOURCE), p.source, int(p.attrs["source_grid"]), path)


def _write_arrays(g: h5py.Group, p: Patient, grid: int, path: Path) -> None:
    """ct, dose, possible_dose_mask, the stacked structures, voxel size and contoured ROIs."""
    cube = (grid,) * 3
    arrays = {"ct": p.ct, "possible_dose_mask": p.possible_dose_mask, **p.structures}
    if p.dose is not None:
        arrays["dose"] = p.dose
    for name, array in arrays.items():
        if array.shape != cube:
            raise input_error(path, f"patient {p.id}: '{name}' has shape {array.shape}, expected {cube}")
    unknown = sorted(set(p.structures) - set(ROIS))
    if unknown:
        raise input_error(path, f"patient {p.id}: unknown structures {unknown}")
    _write_attrs(g, {"voxel_mm": tuple(float(v) for v in p.voxel_mm),
                     "rois": [name for name in ROIS if name in p.structures]})
    _put(g, "ct", p.ct, np.float32)
    if p.dose is not None:
        _put(g, "dose", p.dose, np.float32)
    _put(g, "possible_dose_mask", p.possible_dose_mask, np.uint8)
    stack = np.zeros((len(ROIS), *cube), dtype=np.uint8)
    for i, name in enumerate(ROIS):
        if name in p.structures:
            stack[i] = p.structures[name]
    _put(g, "structures", stack, np.uint8)


def _write_extra(g: h5py.Group, p: Patient, grid: int, path: Path) -> None:
    """The `extra` group: one float32 volume per extra input channel."""
    if not p.extra:
        return
    group = g.create_group(EXTRA)
    for name, array in p.extra.items():
        if not _EXTRA_NAME.fullmatch(name):
            raise input_error(path, f"patient {p.id}: extra input channel {name!r} needs a name of letters, digits "
                                    "and underscores")
        if array.shape != (grid,) * 3:
            raise input_error(path, f"patient {p.id}: extra input '{name}' has shape {array.shape}, expected "
                                    f"{(grid,) * 3}")
        if not np.isfinite(array).all():
            raise input_error(path, f"patient {p.id}: extra input '{name}' holds NaN or infinite values")
        _put(group, name, array, np.float32)


def _write_plans(g: h5py.Group, pid: str, plans: Plans, grid: int, path: Path) -> None:
    """The `plans` group: `dose` (K, G, G, G) and attributes `preferences` (K, P) and `names`."""
    k = len(plans)
    if plans.doses.shape != (k, *(grid,) * 3) or plans.values.shape != (k, len(plans.names)) or not k:
        raise input_error(path, f"patient {pid}: plans of shape {plans.doses.shape} with preferences of shape "
                                f"{plans.values.shape} do not match")
    if not np.isfinite(plans.doses).all() or (plans.doses < 0).any() or not np.isfinite(plans.values).all():
        raise input_error(path, f"patient {pid}: a plan holds negative, NaN or infinite values")
    group = g.create_group(PLANS)
    _put(group, "dose", plans.doses, np.float32)
    group.attrs["preferences"] = plans.values.astype(np.float64)
    group.attrs["names"] = _attr_value("names", list(plans.names))


def _check_physical(p: Patient, path: Path) -> None:
    """Refuse a patient no plan could belong to, naming its source file (else the output)."""
    source = str(p.attrs.get("source") or "")
    where = source if source and Path(source).exists() else path
    for name, array in (("ct", p.ct), ("dose", p.dose)):
        if array is not None and not np.isfinite(array).all():
            raise input_error(where, f"patient {p.id}: the {name} holds NaN or infinite values")
    if p.dose is not None and (p.dose < 0).any():
        raise input_error(where, f"patient {p.id}: the dose holds negative values (min {float(p.dose.min()):g} Gy)")
    if not any(p.structures.get(name, np.zeros(0)).any() for name in TARGETS):
        raise input_error(where, f"patient {p.id}: no target contoured (none of {', '.join(TARGETS)})")


def write_predictions(path: Path, doses: Iterable[tuple[str, np.ndarray, dict[str, Any]]], *,
                      grid: int, source: str = "", total: int | None = None) -> None:
    """Write predicted doses (Gy) with their per-patient attributes (e.g. voxel_mm)."""
    path = Path(path)
    cube = (grid,) * 3
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        group = _root(f, "predictions", grid, source)
        for pid, dose, attrs in progress(doses, total=total, desc=f"writing {path.name}"):
            dose = np.asarray(dose)
            if dose.shape != cube:
                raise input_error(path, f"patient {pid}: dose has shape {dose.shape}, expected {cube}")
            if not np.isfinite(dose).all():
                raise input_error(path, f"patient {pid}: the dose holds NaN or infinite values")
            g = _new_group(group, pid, path)
            _write_attrs(g, attrs)
            _put(g, "dose", dose, np.float32)
        if not len(group):
            raise input_error(path, "no patients to write")


class DataFile:
    """An open nasdose HDF5 file; patients are read on demand.

    The HDF5 handle is opened on first access in each process (and never pickled), so one
    DataFile can be handed to torch DataLoader workers, forked or spawned.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid = -1
        f = self._h5()
        try:
            self.attrs: dict[str, Any] = {k: _plain(v) for k, v in f.attrs.items()}
            self.kind: str = self.attrs.get("nasdose_format", "")
            if self.kind not in KINDS:
                raise input_error(self.path, "not a nasdose file (no nasdose_format attribute)")
            if self.attrs.get("format_version") != FORMAT_VERSION:
                raise input_error(self.path, f"format version {self.attrs.get('format_version')} "
                                             f"is not supported (expected {FORMAT_VERSION}: "
                                             "make it again with this nasdose)")
            if not isinstance(self.attrs.get("grid"), int) or "patients" not in f:
                raise input_error(self.path, "incomplete nasdose file (no grid or no patients)")
            self.grid: int = self.attrs["grid"]
            # Input channels after the standard ones, in this order (nas_dose.data.dataset).
            self.extra_channels: tuple[str, ...] = tuple(self.attrs.get("extra_channels", ()))
            self._splits = {pid: _plain(g.attrs.get("split", "")) for pid, g in f["patients"].items()}
        except Exception:
            self.close()
            raise

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            if not self.path.is_file():
                raise input_error(self.path, "file not found")
            try:
                self._file = h5py.File(self.path, "r")
            except OSError:
                raise input_error(self.path, "not a readable HDF5 file (truncated or of another kind)") \
                    from None
            self._pid = os.getpid()
        return self._file

    def only_extra(self, names: Sequence[str]) -> DataFile:
        """Read (and report) only these of the extra input channels, for a model that takes fewer
        than the data set has (`train.data.hide`); a name the file lacks is an error."""
        missing = [n for n in names if n not in self.extra_channels]
        if missing:
            raise input_error(self.path, f"no extra input channel {', '.join(missing)} (the file has "
                                         f"[{', '.join(self.extra_channels)}])")
        self.extra_channels = tuple(n for n in self.extra_channels if n in names)
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": -1}

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._splits)

    def __contains__(self, pid: object) -> bool:
        return pid in self._splits

    def ids(self, split: str | None = None) -> list[str]:
        """Patient ids in the order they were written, optionally of one split only."""
        if split is not None and split not in SPLITS:
            raise input_error(self.path, f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        return [pid for pid, s in self._splits.items() if split is None or s == split]

    def splits(self) -> dict[str, list[str]]:
        """The non-empty splits and their patients, in the order of SPLITS."""
        return {s: ids for s in SPLITS if (ids := self.ids(s))}

    def _group(self, pid: str) -> h5py.Group:
        if pid not in self._splits:
            raise input_error(self.path, f"no patient {pid!r}")
        return self._h5()["patients"][pid]

    def _dataset(self, group: h5py.Group, pid: str, name: str, shape: tuple[int, ...]) -> h5py.Dataset:
        if name not in group:
            raise input_error(self.path, f"patient {pid}: no '{name}' array")
        ds = group[name]
        if not isinstance(ds, h5py.Dataset) or ds.shape != shape:
            found = getattr(ds, "shape", "a group")
            raise input_error(self.path, f"patient {pid}: '{name}' has shape {found}, expected {shape}")
        return ds

    def _array(self, group: h5py.Group, pid: str, name: str, shape: tuple[int, ...],
               index: Any = ()) -> np.ndarray:
        """One dataset of a patient, checked for shape (and finite values), read whole or at `index`."""
        ds = self._dataset(group, pid, name, shape)
        try:
            array = ds[index]
        except OSError:
            raise input_error(self.path, f"patient {pid}: '{name}' cannot be read (corrupt file)") from None
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise input_error(self.path, f"patient {pid}: '{name}' holds NaN or infinite values")
        return array

    def verify(self, ids: Iterable[str], values: bool = False) -> None:
        """Check that each patient holds every array its kind needs, in the right shapes (and,
        with `values`, finite values: every array is read), so that a broken patient is an error
        before any work starts, not when a run first reads it."""
        cube = (self.grid,) * 3
        for pid in ids:
            group = self._group(pid)
            if self.kind == "predictions":
                self._dataset(group, pid, "dose", cube)
            else:
                for name, shape in (("ct", cube), ("possible_dose_mask", cube), ("structures", (len(ROIS), *cube))):
                    self._dataset(group, pid, name, shape)
                if "dose" in group:
                    self._dataset(group, pid, "dose", cube)
                for name in self.extra_channels:
                    self._dataset(self._extra(group, pid), pid, name, cube)
            if values and self.kind == "dataset":
                self.read(pid)
            elif values:
                self.read_dose(pid)

    def patient_attrs(self, pid: str) -> dict[str, Any]:
        """A patient's group attributes as plain Python."""
        return {k: _plain(v) for k, v in self._group(pid).attrs.items()}

    def has_dose(self, pid: str) -> bool:
        """Whether the patient has a dose (a data set's patient without a plan has none)."""
        return "dose" in self._group(pid)

    def read_dose(self, pid: str, region: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """A patient's dose (float32 Gy), whole or the box `region`; an error for a patient without one."""
        return self._array(self._group(pid), pid, "dose", (self.grid,) * 3, region or ()).astype(np.float32)

    def n_plans(self, pid: str) -> int:
        """How many preference plans the patient holds (0: only its dose)."""
        group = self._group(pid)
        return len(group[PLANS]["dose"]) if PLANS in group else 0

    def plan_preferences(self, pid: str) -> tuple[tuple[str, ...], np.ndarray]:
        """The names and the (K, P) float32 preference values of the patient's plans."""
        group = self._plans(pid)
        values = np.asarray(group.attrs["preferences"], dtype=np.float32)
        names = tuple(_plain(group.attrs["names"]))
        if values.ndim != 2 or values.shape != (len(group["dose"]), len(names)) or not np.isfinite(values).all():
            raise input_error(self.path, f"patient {pid}: plan preferences of shape {values.shape} do not fit its "
                                         f"{len(group['dose'])} plans and {len(names)} names")
        return names, values

    def read_plan(self, pid: str, k: int) -> np.ndarray:
        """Plan `k`'s dose (float32 Gy); the other plans stay unread."""
        group = self._plans(pid)
        return self._array(group, pid, "dose", (len(group["dose"]), *(self.grid,) * 3), k).astype(np.float32)

    def read_plans(self, pid: str) -> Plans | None:
        """All the patient's preference plans, or None when it holds none."""
        if not self.n_plans(pid):
            return None
        names, values = self.plan_preferences(pid)
        doses = np.stack([self.read_plan(pid, k) for k in range(len(values))])
        return Plans(doses=doses, values=values, names=names)

    def _plans(self, pid: str) -> h5py.Group:
        group = self._group(pid)
        if PLANS not in group:
            raise input_error(self.path, f"patient {pid}: no preference plans (make the data with --preferences K)")
        return group[PLANS]

    def _extra(self, group: h5py.Group, pid: str) -> h5py.Group:
        if EXTRA not in group:
            raise input_error(self.path, f"patient {pid}: no extra input channels (the file names "
                                         f"{', '.join(self.extra_channels)})")
        return group[EXTRA]

    def read_structure(self, pid: str, name: str) -> np.ndarray:
        """One structure mask (bool), all False where it was not contoured; the others stay unread."""
        if name not in ROIS:
            raise input_error(self.path, f"unknown structure {name!r}")
        shape = (len(ROIS), *(self.grid,) * 3)
        return self._array(self._group(pid), pid, "structures", shape, ROIS.index(name)).astype(bool)

    def read(self, pid: str) -> Patient:
        """One patient, whole; only its own arrays are read (not its source-grid ones)."""
        return self._read(pid, self._group(pid), self.grid)

    def source_grid(self, pid: str) -> int:
        """The grid of the patient's source arrays (the data set's grid when not resampled)."""
        return int(self.patient_attrs(pid).get("source_grid", self.grid))

    def _source_group(self, pid: str) -> tuple[h5py.Group, int]:
        group = self._group(pid)
        grid = self.source_grid(pid)
        if SOURCE in group:
            return group[SOURCE], grid
        if grid != self.grid:
            raise input_error(self.path, f"patient {pid}: resampled, but holds no source-grid arrays")
        return group, grid

    def source_mask(self, pid: str) -> np.ndarray:
        """The possible-dose mask on the source grid (where predictions are written back)."""
        group, grid = self._source_group(pid)
        return self._array(group, pid, "possible_dose_mask", (grid,) * 3).astype(bool)

    def source_attrs(self, pid: str) -> dict[str, Any]:
        """The patient's attributes as they hold on its source grid (voxel size, no resampling)."""
        group, grid = self._source_group(pid)
        return {**self.patient_attrs(pid), "voxel_mm": _plain(group.attrs["voxel_mm"]), "resample_factor": 1,
                "source_grid": grid}

    def to_source_grid(self, pid: str, dose: np.ndarray) -> np.ndarray:
        """A dose on this data set's grid, upsampled to the patient's source grid and zeroed
        outside its source mask, as `nasdose predict` writes it (itself when not resampled, or
        when it is on the source grid already: a cascade's)."""
        factor = self.source_grid(pid) // self.grid
        on_source = dose.shape == (self.source_grid(pid),) * 3
        return dose if factor == 1 or on_source else upsample_dose(dose, factor, mask=self.source_mask(pid))

    def read_source(self, pid: str, region: tuple[slice, slice, slice] | None = None) -> Patient:
        """The patient on the grid it was imported from, where the official scores are computed
        and the full-resolution stage of a cascade works; `read(pid)` when it was not resampled.

        `region` (three slices) reads that box only: HDF5 decompresses the chunks it touches.
        """
        return self._read(pid, *self._source_group(pid), region)

    def _read(self, pid: str, group: h5py.Group, grid: int,
              region: tuple[slice, slice, slice] | None = None) -> Patient:
        if self.kind != "dataset":
            raise input_error(self.path, "a prediction file holds doses only (use read_dose)")
        attrs = self.patient_attrs(pid)
        arrays = {k: _plain(v) for k, v in group.attrs.items()}
        rois, voxel_mm = arrays.get("rois", []), arrays.get("voxel_mm")
        for key in ("rois", "voxel_mm"):
            attrs.pop(key, None)
        if voxel_mm is None:
            raise input_error(self.path, f"patient {pid}: no voxel_mm attribute")
        cube, index = (grid,) * 3, region or ()
        stack = (len(ROIS), *cube)
        return Patient(
            id=pid,
            ct=self._array(group, pid, "ct", cube, index).astype(np.float32),
            possible_dose_mask=self._array(group, pid, "possible_dose_mask", cube, index).astype(bool),
            structures={name: self._array(group, pid, "structures", stack, (ROIS.index(name), *index)).astype(bool)
                        for name in rois},
            voxel_mm=tuple(voxel_mm),
            dose=self._array(group, pid, "dose", cube, index).astype(np.float32) if "dose" in group else None,
            attrs=attrs,
            # on the data set's grid only: a resampled patient's source arrays have none
            extra={name: self._array(self._extra(group, pid), pid, name, cube, index).astype(np.float32)
                   for name in self.extra_channels} if grid == self.grid else {},
        )


def open_data(path: Path) -> DataFile:
    """Open a nasdose data set or prediction file (an error names a missing or foreign file)."""
    return DataFile(path)
