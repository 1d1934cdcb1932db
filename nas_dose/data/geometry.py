"""Voxel geometry: patients of any shape, spacing and orientation onto nasdose's cubic grid, and
doses back onto the patient's own voxels.

Everything inside nasdose works on a cube in OpenKBP axis order (nas_dose.data.patient). An
importer of any other format reads its volumes as stored, describes their voxel grid with a
`Geometry`, and calls `patient_from_volumes`, which resamples them (only at this boundary) onto
an internal cubic "source grid" chosen by `internal_geometry` and records both geometries in the
patient's attributes; a writer calls `dose_on_original` to take a predicted dose back.

Coordinates: every `Geometry` is in one patient coordinate system, LPS as in DICOM (x towards
the patient's left, y towards posterior, z towards superior, in mm); NIfTI's RAS affines are
converted with `from_ras_affine` / `ras_affine`. Voxel (i, j, k) of an array of that geometry lies at
`origin + direction @ (spacing * (i, j, k))`: the origin is the centre of the first voxel.

Resampling is scipy.ndimage's affine transform (linear for CT and dose; masks linearly as
fractions, kept where more than half in). A grid that is the source's with axes only swapped or
reversed is copied exactly instead, so an axis-aligned cubic volume goes in and comes back
bit-for-bit.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import NasDoseError
from .patient import CT_STORED_RANGE, Patient

HU_OFFSET = 1024.0  # the CT is stored as OpenKBP stores it: HU + 1024
AIR_HU = -1024.0  # what the CT is outside the imported volume
# Without a possible-dose mask the mask is the body: voxels denser than this (HU).
BODY_HU = -500.0
BODY_RULE = f"CT > {BODY_HU:g} HU"
# The internal grid's axes in LPS (columns): OpenKBP's axis 0 runs anterior->posterior (+y), axis
# 1 right->left (+x), axis 2 superior->inferior (-z).
OPENKBP_DIRECTION: tuple[float, ...] = (0.0, 1.0, 0.0,
                                        1.0, 0.0, 0.0,
                                        0.0, 0.0, -1.0)
# RAS (NIfTI) <-> LPS (DICOM, nasdose): x and y change sign. Its own inverse.
RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Attribute name prefixes: the grid the patient's files are on, and the internal source grid.
ORIGINAL, INTERNAL = "original", "internal"
_TOL = 1e-4  # voxels: closer than this is the same position


@dataclass(frozen=True)
class Geometry:
    """A voxel grid in LPS patient coordinates (mm).

    shape: voxels along the array's axes 0, 1, 2. spacing: voxel size along each of them (mm).
    origin: the centre of voxel (0, 0, 0) (mm, LPS). direction: the 3x3 matrix, row-major as 9
    floats, whose column j is the unit LPS direction in which array axis j runs (orthonormal;
    oblique allowed).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape {self.shape}: expected 3 positive sizes")
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"voxel spacing {self.spacing}: expected 3 positive sizes (mm)")
        if len(self.origin) != 3 or not all(math.isfinite(o) for o in self.origin):
            raise ValueError(f"origin {self.origin}: expected 3 finite coordinates (mm)")
        m = np.asarray(self.direction, dtype=np.float64)
        if m.shape != (9,) or not np.allclose(m.reshape(3, 3).T @ m.reshape(3, 3), np.eye(3), atol=1e-3):
            raise ValueError("the voxel axes are not orthogonal unit vectors (a sheared or singular affine)")

    def matrix(self) -> np.ndarray:
        """The direction as a 3x3 array (columns: the array axes' directions)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def affine(self) -> np.ndarray:
        """The 4x4 map from voxel indices (i, j, k, 1) to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.matrix() * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    def ras_affine(self) -> np.ndarray:
        """The same map into RAS millimetres: a NIfTI affine."""
        return RAS_LPS @ self.affine()

    @classmethod
    def from_affine(cls, affine: np.ndarray, shape: tuple[int, ...]) -> Geometry:
        """The geometry of an array of `shape` whose voxel -> LPS map is `affine` (4x4); a
        ValueError for a sheared or singular one."""
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise ValueError(f"an affine must be a finite 4x4 matrix, got shape {affine.shape}")
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        if not (spacing > 0).all():
            raise ValueError("the affine is singular (a voxel axis of length 0)")
        return cls(shape=_ints(shape), spacing=_floats(spacing), origin=_floats(affine[:3, 3]),
                   direction=tuple(float(v) for v in (affine[:3, :3] / spacing).ravel()))

    @classmethod
    def from_ras_affine(cls, affine: np.ndarray, shape: tuple[int, ...]) -> Geometry:
        """From a NIfTI (RAS) affine."""
        return cls.from_affine(RAS_LPS @ np.asarray(affine, dtype=np.float64), shape)

    def to_attrs(self, prefix: str) -> dict[str, list[int] | list[float]]:
        """Patient attributes `<prefix>_shape`, `_spacing`, `_origin`, `_direction` (HDF5-storable)."""
        return {f"{prefix}_shape": list(self.shape), f"{prefix}_spacing": list(self.spacing),
                f"{prefix}_origin": list(self.origin), f"{prefix}_direction": list(self.direction)}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], prefix: str) -> Geometry | None:
        """The geometry `to_attrs(prefix)` stored (None when it is absent)."""
        if f"{prefix}_shape" not in attrs:
            return None
        return cls(shape=_ints(attrs[f"{prefix}_shape"]), spacing=_floats(attrs[f"{prefix}_spacing"]),
                   origin=_floats(attrs[f"{prefix}_origin"]),
                   direction=tuple(float(v) for v in attrs[f"{prefix}_direction"]))

    def cropped(self, start: Any, stop: Any) -> Geometry:
        """The voxels [start, stop) along each axis, as a grid of their own."""
        first = np.asarray(start, dtype=np.float64)
        return Geometry(shape=_ints(np.asarray(stop) - first), spacing=self.spacing,
                        origin=_floats((self.affine() @ [*first, 1.0])[:3]), direction=self.direction)

    def resized(self, n: int) -> Geometry:
        """The same box (same direction and extent) cut into n voxels along every axis: the
        geometry of a cube of this one block-downsampled (or upsampled) to n³."""
        spacing = np.asarray(self.spacing) * np.asarray(self.shape) / n
        shift = self.matrix() @ ((spacing - np.asarray(self.spacing)) / 2)
        return Geometry(shape=(n, n, n), spacing=_floats(spacing), origin=_floats(np.asarray(self.origin) + shift),
                        direction=self.direction)


def _ints(values: Any) -> tuple[int, int, int]:
    a, b, c = (int(v) for v in values)
    return a, b, c


def _floats(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def _reoriented(g: Geometry) -> Geometry | None:
    """The same voxels along OpenKBP's axes (axes swapped and reversed), when g's axes run along
    the patient's axes; None for an oblique grid."""
    internal = np.asarray(OPENKBP_DIRECTION).reshape(3, 3)
    cosines = internal.T @ g.matrix()  # [a, b]: internal axis a . g's axis b
    axes = np.abs(cosines).argmax(axis=1)
    if sorted(axes) != [0, 1, 2] or not np.allclose(np.abs(cosines[[0, 1, 2], axes]), 1, atol=1e-6):
        return None
    first = [0 if cosines[a, b] > 0 else g.shape[b] - 1 for a, b in enumerate(axes)]
    corner = [first[list(axes).index(b)] for b in range(3)]
    return Geometry(shape=_ints(g.shape[b] for b in axes), spacing=_floats(g.spacing[b] for b in axes),
                    origin=_floats((g.affine() @ [*corner, 1])[:3]), direction=OPENKBP_DIRECTION)


def internal_geometry(original: Geometry, grid: int, spacing: float | None = None) -> Geometry:
    """The cubic grid, in OpenKBP axis order, that a patient on `original` is imported onto; its
    side is a multiple of `grid` (the training grid, which block-downsamples it).

    Without `spacing`, a cube whose axes run along the patient's and whose side `grid` divides
    is only reoriented (its voxels, exactly). Otherwise the cube has isotropic voxels of
    `spacing` mm (default: the original's coarsest voxel size, so no axis is undersampled more
    than it was) and the fewest multiples of `grid` voxels that cover the original volume's
    extent, centred on it.
    """
    if grid < 1:
        raise ValueError(f"grid {grid}: must be at least 1")
    if spacing is None:
        turned = _reoriented(original)
        if turned is not None and len(set(turned.shape)) == 1 and turned.shape[0] % grid == 0:
            return turned
    step = float(spacing) if spacing is not None else max(original.spacing)
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"spacing {spacing}: must be a positive size (mm)")
    internal = np.asarray(OPENKBP_DIRECTION).reshape(3, 3)
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, original.shape[0] - 0.5)
                        for j in (-0.5, original.shape[1] - 0.5) for k in (-0.5, original.shape[2] - 0.5)])
    along = internal.T @ (original.affine() @ corners.T)[:3]  # the corners on the internal axes (mm)
    extent = float((along.max(axis=1) - along.min(axis=1)).max())
    n = grid * max(1, math.ceil(extent / (step * grid) - 1e-6))
    centre = (along.max(axis=1) + along.min(axis=1)) / 2
    return Geometry(shape=(n, n, n), spacing=(step, step, step),
                    origin=_floats(internal @ (centre - step * (n - 1) / 2)), direction=OPENKBP_DIRECTION)


def _permutation(m: np.ndarray, source: Geometry, target: Geometry) -> tuple[list[int], list[bool]] | None:
    """When target index -> source index (`m`, 4x4) only swaps and reverses axes within the source,
    the source axis of each target axis and whether it runs backwards; else None."""
    rounded = np.round(m[:3, :3])
    if not (np.allclose(m[:3, :3], rounded, atol=_TOL / max(target.shape))
            and np.allclose(m[:3, 3], np.round(m[:3, 3]), atol=_TOL)):
        return None
    axes = [int(np.abs(rounded[:, a]).argmax()) for a in range(3)]
    if sorted(axes) != [0, 1, 2] or np.abs(rounded).sum() != 3:
        return None
    flips = [bool(rounded[b, a] < 0) for a, b in enumerate(axes)]
    for a, b in enumerate(axes):
        if target.shape[a] != source.shape[b] or round(m[b, 3]) != (source.shape[b] - 1 if flips[a] else 0):
            return None
    return axes, flips


def resample(volume: np.ndarray, source: Geometry, target: Geometry, *, order: int = 1,
             fill: float = 0.0) -> np.ndarray:
    """`volume` (on `source`) on the `target` grid: interpolated (`order` 1: trilinear, 0: nearest;
    `fill` outside the source volume, the edge voxels' values out to the volume's boundary) as
    float32, or its voxels exactly (any dtype) when `target` is `source` with axes swapped or
    reversed."""
    if volume.shape != source.shape:
        raise ValueError(f"a volume of shape {volume.shape} on a grid of shape {source.shape}")
    m = np.linalg.solve(source.affine(), target.affine())  # target index -> source index
    exact = _permutation(m, source, target)
    if exact is not None:
        axes, flips = exact
        turned = np.transpose(volume, axes)
        return np.ascontiguousarray(turned[tuple(slice(None, None, -1) if f else slice(None) for f in flips)])
    out = ndimage.affine_transform(np.asarray(volume, dtype=np.float32), m[:3, :3], offset=m[:3, 3],
                                   output_shape=target.shape, order=order, mode="nearest")
    out[~_inside(m, source.shape, target.shape)] = fill
    return out


def _inside(m: np.ndarray, shape: tuple[int, int, int], out_shape: tuple[int, int, int]) -> np.ndarray:
    """Which voxels of the target grid lie inside the source volume (within its outer voxels'
    half width), by `m` (target index -> source index): there the interpolation extends the edge
    voxels (a volume's edge is not faded into the fill), outside it is the fill."""
    i, j, k = np.ogrid[:out_shape[0], :out_shape[1], :out_shape[2]]
    inside = np.ones(out_shape, dtype=bool)
    for axis in range(3):
        at = m[axis, 0] * i + m[axis, 1] * j + m[axis, 2] * k + m[axis, 3]
        inside &= (at >= -0.5 - _TOL) & (at <= shape[axis] - 0.5 + _TOL)
    return inside


def _mask(mask: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
    """A mask on `target`: the voxels more than half inside it (linear interpolation of the mask as a
    fraction), or its single most-covered voxel when it would vanish. Only the target voxels
    near the mask are interpolated (a structure is small beside the grid)."""
    inside = np.asarray(mask) != 0
    m = np.linalg.solve(source.affine(), target.affine())
    if _permutation(m, source, target) is not None or not inside.any():
        return resample(inside, source, target) if inside.any() else np.zeros(target.shape, dtype=bool)
    nonzero = np.argwhere(inside)
    lo, hi = nonzero.min(axis=0) - 1, nonzero.max(axis=0) + 1  # with the interpolation's reach
    corners = np.array([[i, j, k, 1.0] for i in (lo[0], hi[0]) for j in (lo[1], hi[1]) for k in (lo[2], hi[2])])
    at = np.linalg.solve(m, corners.T)[:3]  # the corners in target indices
    start = np.clip(np.floor(at.min(axis=1)).astype(int), 0, target.shape)
    stop = np.clip(np.ceil(at.max(axis=1)).astype(int) + 1, 0, target.shape)
    out = np.zeros(target.shape, dtype=bool)
    if (stop <= start).any():
        return out
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    fraction = resample(inside, source, target.cropped(start, stop))
    out[box] = fraction > 0.5
    if not out.any() and fraction.max() > 0:
        out[box][np.unravel_index(int(fraction.argmax()), fraction.shape)] = True
    return out


def patient_from_volumes(pid: str, ct_hu: np.ndarray, masks: Mapping[str, np.ndarray], dose_gy: np.ndarray | None,
                         geometry: Geometry, *, grid: int, spacing: float | None = None,
                         possible_dose_mask: np.ndarray | None = None, dose_geometry: Geometry | None = None,
                         attrs: Mapping[str, Any] | None = None) -> Patient:
    """A patient from volumes on the grid `geometry` (as the files store them, any axis order),
    on its internal cubic source grid (`internal_geometry(geometry, grid, spacing)`), which the
    importer then block-downsamples to `grid`.

    ct_hu: CT in HU. masks: ROI name (nas_dose.data.patient.ROIS) -> mask, any dtype, non-zero
    inside. dose_gy: the plan's dose (Gy) or None, on `geometry` or, when given, on its own
    `dose_geometry` (an RT Dose grid). possible_dose_mask: None makes it the body (`BODY_RULE`,
    recorded in attrs["possible_dose_mask_from"]). attrs: more patient attributes, e.g.
    {"split": "train", "source": "/path/of/the/files"}. Every other array must have
    geometry.shape. Outside the original volume the CT is air and everything else 0; a shape
    that does not match is a NasDoseError, a `spacing` that is not positive a ValueError.

    Both grids are stored in the returned attributes (`Geometry.to_attrs` with prefixes
    "original" and "internal"), so they survive the HDF5 round trip and `dose_on_original` can
    take a prediction back.
    """
    dose_on = dose_geometry or geometry
    for name, array, on in [("ct", ct_hu, geometry), ("dose", dose_gy, dose_on),
                            ("possible_dose_mask", possible_dose_mask, geometry),
                            *((name, m, geometry) for name, m in masks.items())]:
        if array is not None and array.shape != on.shape:
            raise NasDoseError(f"patient {pid}: '{name}' has shape {array.shape}, its grid {on.shape}")
    internal = internal_geometry(geometry, grid, spacing)
    hu = resample(np.asarray(ct_hu), geometry, internal, fill=AIR_HU)  # any dtype: exact when reoriented
    ct = np.clip(hu.astype(np.float64) + HU_OFFSET, *CT_STORED_RANGE).astype(np.float32)
    extra = dict(attrs or {})
    if possible_dose_mask is None:
        extra["possible_dose_mask_from"] = BODY_RULE
        mask = ct > BODY_HU + HU_OFFSET
    else:
        mask = _mask(possible_dose_mask, geometry, internal)
    dose = None
    if dose_gy is not None:
        dose = np.clip(resample(np.asarray(dose_gy, dtype=np.float32), dose_on, internal), 0, None)
    return Patient(
        id=pid, ct=ct, possible_dose_mask=mask,
        structures={name: _mask(m, geometry, internal) for name, m in masks.items()},
        voxel_mm=internal.spacing,
        dose=None if dose is None else dose.astype(np.float32),
        attrs={**extra, **geometry.to_attrs(ORIGINAL), **internal.to_attrs(INTERNAL)},
    )


def original_geometry(attrs: Mapping[str, Any]) -> Geometry | None:
    """The grid a patient's files were on (None for a patient imported without one: OpenKBP's,
    synthetic ones)."""
    return Geometry.from_attrs(attrs, ORIGINAL)


def dose_on_original(patient_or_attrs: Patient | Mapping[str, Any], dose_on_internal_grid: np.ndarray,
                     onto: Geometry | None = None) -> tuple[np.ndarray, Geometry]:
    """A dose (Gy) on the patient's internal cubic grid -- its source grid or any other cube over
    the same box, e.g. the training grid -- on the grid of the patient's original files (or
    on `onto`, any grid in the same patient coordinates, e.g. a plan's dose grid), with that
    grid: (array in that grid's axis order and shape, float32 Gy, trilinear, 0 outside the
    internal cube; its Geometry). `patient_or_attrs`: a Patient from `patient_from_volumes` or a
    data set's patient attributes (`DataFile.patient_attrs` or `source_attrs`); one without the
    geometries (an OpenKBP or synthetic patient) is a NasDoseError."""
    attrs = patient_or_attrs.attrs if isinstance(patient_or_attrs, Patient) else patient_or_attrs
    original, internal = original_geometry(attrs), Geometry.from_attrs(attrs, INTERNAL)
    if original is None or internal is None:
        raise NasDoseError("the patient has no original geometry (it was not imported from NIfTI or DICOM)")
    dose = np.asarray(dose_on_internal_grid)
    if dose.ndim != 3 or len(set(dose.shape)) != 1:
        raise NasDoseError(f"a dose of shape {dose.shape}: expected a cube on the patient's internal grid")
    on = internal if dose.shape == internal.shape else internal.resized(dose.shape[0])
    target = onto or original
    return np.clip(resample(dose.astype(np.float32), on, target), 0, None).astype(np.float32), target
