"""Training augmentation: flips, rotations about the axial axis and shifts, applied identically
to every array of an item (input, target, mask, and a teacher's prediction in distillation).

Arrays are channel-first with the three spatial axes last, in OpenKBP order (axis 0 anterior ->
posterior, axis 1 right -> left, axis 2 superior -> inferior). Each array has a kind, which
fixes how it is resampled and what fills the voxels moved in from outside the volume:

- "continuous": linear interpolation, background 0 (dose, predictions);
- "mask": nearest neighbour, background 0; the values stay in the input's value set, so
  binary masks stay exactly binary and a PTV level map keeps its levels;
- "ct": linear interpolation, background air (each channel's lowest value, whatever its scale);
- a ChannelLayout: one of the above per channel, plus the channel pairs that describe
  left/right structures, which trade places when the transform mirrors the patient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import numpy as np

from ..config import ConfigError
from ..errors import NasDoseError

KINDS = ("continuous", "mask", "ct")


@dataclass
class AugmentConfig:
    """Each of flip along axis 0, flip along axis 1, rotation and shift happens independently
    with `probability`; rotations are by a random non-zero multiple of `rotation_step_deg`."""

    enabled: bool = True
    flip: bool = True
    rotate: bool = True
    rotation_step_deg: float = 40.0
    max_shift: int = 4
    probability: float = 0.5

    def validate(self) -> None:
        if not 0.0 < self.rotation_step_deg < 360.0:
            raise ConfigError(f"augment: rotation_step_deg must be in (0, 360), got {self.rotation_step_deg}")
        if self.max_shift < 0:
            raise ConfigError(f"augment: max_shift must be >= 0, got {self.max_shift}")
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"augment: probability must be in [0, 1], got {self.probability}")


@dataclass(frozen=True)
class ChannelLayout:
    """The kind of each channel of a multi-channel array, and the (right, left) channel pairs
    that swap under a mirroring transform: a mirrored right parotid is a left parotid."""

    kinds: tuple[str, ...]
    mirror_pairs: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Transform:
    """One spatial transform: flips, then rotation about the volume's centre in the plane of
    axes 0 and 1 (from axis 0 towards axis 1, as np.rot90 over those axes), then an integer
    shift along each axis."""

    flips: tuple[bool, bool] = (False, False)
    angle_deg: float = 0.0
    shift: tuple[int, int, int] = (0, 0, 0)

    @property
    def mirrors(self) -> bool:
        """One flip reverses handedness (the patient's right becomes its left); two flips make a
        180 degree rotation, which does not."""
        return self.flips[0] != self.flips[1]


def sample_transform(cfg: AugmentConfig, rng: np.random.Generator) -> Transform:
    """Draw a transform. The same number of values is drawn whatever the config, so a given
    rng state always maps to the same transform family."""
    u = rng.random(4)
    steps = math.ceil(360.0 / cfg.rotation_step_deg - 1e-9)
    k = int(rng.integers(1, steps))
    dx, dy, dz = (int(s) for s in rng.integers(-cfg.max_shift, cfg.max_shift + 1, size=3))
    p = cfg.probability
    return Transform(
        flips=(bool(cfg.flip and u[0] < p), bool(cfg.flip and u[1] < p)),
        angle_deg=k * cfg.rotation_step_deg if cfg.rotate and u[2] < p else 0.0,
        shift=(dx, dy, dz) if u[3] < p else (0, 0, 0),
    )


def augment(arrays: Mapping[str, np.ndarray], kinds: Mapping[str, str | ChannelLayout],
            cfg: AugmentConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Apply one random transform, the same for every array. A disabled config is the identity."""
    _check(arrays, kinds)
    if not cfg.enabled:
        return dict(arrays)
    return apply_transform(arrays, kinds, sample_transform(cfg, rng))


def apply_transform(arrays: Mapping[str, np.ndarray], kinds: Mapping[str, str | ChannelLayout],
                    transform: Transform) -> dict[str, np.ndarray]:
    """Apply `transform` to every array according to its kind (see the module docstring)."""
    _check(arrays, kinds)
    out = {}
    for name, array in arrays.items():
        kind = kinds[name]
        channels = array.reshape(-1, *array.shape[-3:])
        channel_kinds = kind.kinds if isinstance(kind, ChannelLayout) else (kind,) * len(channels)
        moved = np.stack([_transform_volume(v, k, transform) for v, k in zip(channels, channel_kinds)])
        if isinstance(kind, ChannelLayout) and transform.mirrors:
            for right, left in kind.mirror_pairs:
                moved[[right, left]] = moved[[left, right]]
        out[name] = moved.reshape(array.shape)
    return out


def _check(arrays: Mapping[str, np.ndarray], kinds: Mapping[str, str | ChannelLayout]) -> None:
    shape = None
    for name, array in arrays.items():
        if name not in kinds:
            raise NasDoseError(f"augment: no kind given for array '{name}'")
        kind = kinds[name]
        if array.ndim < 3:
            raise NasDoseError(f"augment: array '{name}' has {array.ndim} axes, needs 3 spatial axes")
        if shape is not None and array.shape[-3:] != shape:
            raise NasDoseError(f"augment: array '{name}' has spatial shape {array.shape[-3:]}, "
                               f"the others {shape}")
        shape = array.shape[-3:]
        if isinstance(kind, ChannelLayout):
            if array.ndim != 4 or array.shape[0] != len(kind.kinds):
                raise NasDoseError(f"augment: array '{name}' of shape {array.shape} does not match "
                                   f"its layout of {len(kind.kinds)} channels")
            unknown = [k for k in kind.kinds if k not in KINDS]
        else:
            unknown = [] if kind in KINDS else [kind]
        if unknown:
            raise NasDoseError(f"augment: array '{name}' has unknown kind {unknown[0]!r} "
                               f"(known: {', '.join(KINDS)})")


def _transform_volume(volume: np.ndarray, kind: str, t: Transform) -> np.ndarray:
    background = volume.min() if kind == "ct" and volume.size else volume.dtype.type(0)
    work = volume.view(np.uint8) if volume.dtype == bool else volume
    if t.flips[0]:
        work = work[::-1]
    if t.flips[1]:
        work = work[:, ::-1]
    if t.angle_deg % 360:
        work = _rotate(work, t.angle_deg, order=0 if kind == "mask" else 1, background=background)
    work = _shift(work, t.shift, background)
    return work.view(bool) if volume.dtype == bool else work


def _rotate(volume: np.ndarray, angle_deg: float, order: int, background: float) -> np.ndarray:
    """Rotate about the centre in the plane of axes 0 and 1, resampling once: as
    `ndimage.affine_transform` with spline `order` 0 or 1 and mode "constant" would, to float
    rounding. The rotation leaves axis 2 alone, so every axial row samples the same in-plane
    positions: gathering whole rows by a plan made once per (plane, angle) is many times cheaper
    than interpolating each voxel in 3D, and loading a 128³ patient is what keeps a GPU waiting."""
    nx, ny, nz = volume.shape
    rows = volume.reshape(nx * ny, nz)
    out = np.full((nx * ny, nz), background, dtype=volume.dtype)
    if order == 0:
        inside, source = _rotation_plan(nx, ny, angle_deg, 0)
        out[inside] = rows[source]
    else:
        inside, corner, weights = _rotation_plan(nx, ny, angle_deg, 1)
        value = rows[corner] * weights[0][:, None]
        for k, step in enumerate((ny, 1, ny + 1), start=1):
            value += rows[corner + step] * weights[k][:, None]
        out[inside] = value
    return out.reshape(volume.shape)


@lru_cache(maxsize=32)
def _rotation_plan(nx: int, ny: int, angle_deg: float, order: int) -> tuple[np.ndarray, ...]:
    """For each in-plane output position inside the rotated input, where it reads from: with
    order 0 the nearest input row, with order 1 the lower corner row of its 2×2 neighbourhood
    and the four bilinear weights. Positions outside [0, n-1] keep the background, as in
    ndimage's "constant" mode."""
    theta = math.radians(angle_deg)
    # Rounded so that multiples of 90 degrees map voxel centres exactly onto voxel centres.
    cos, sin = round(math.cos(theta), 12), round(math.sin(theta), 12)
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    i, j = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float), indexing="ij")
    # Each output voxel's input position: the inverse rotation about the centre.
    x = (cos * i + sin * j + (cx - (cos * cx + sin * cy))).ravel()
    y = (-sin * i + cos * j + (cy - (-sin * cx + cos * cy))).ravel()
    inside = (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
    x, y = x[inside], y[inside]
    if order == 0:
        return np.flatnonzero(inside), np.floor(x + 0.5).astype(np.intp) * ny + np.floor(y + 0.5).astype(np.intp)
    x0, y0 = np.minimum(np.floor(x), nx - 2), np.minimum(np.floor(y), ny - 2)
    fx, fy = x - x0, y - y0
    # float64, as ndimage interpolates: the four weights then sum to 1 closely enough that a
    # constant float32 field stays exactly that constant.
    weights = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    return np.flatnonzero(inside), (x0 * ny + y0).astype(np.intp), weights


def _shift(volume: np.ndarray, shift: tuple[int, int, int], background: float) -> np.ndarray:
    """Integer shift; voxels moved in from outside take the background value."""
    if not any(shift):
        return np.ascontiguousarray(volume)
    out = np.full(volume.shape, background, dtype=volume.dtype)
    dst, src = [], []
    for s, n in zip(shift, volume.shape):
        s = max(-n, min(n, s))
        dst.append(slice(max(s, 0), n + min(s, 0)))
        src.append(slice(max(-s, 0), n - max(s, 0)))
    out[tuple(dst)] = volume[tuple(src)]
    return out
