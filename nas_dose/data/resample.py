"""Integer-factor block downsampling that keeps every structure, and upsampling doses back.

Training on a coarser grid is much cheaper, but a small organ must not vanish and the dose at a
field edge must not be diluted by the zeros outside the possible-dose mask; predictions are
upsampled back to the source grid for scoring.
"""
from __future__ import annotations

import dataclasses
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NasDoseError
from .patient import Patient


def resample_factor(source_grid: int, grid: int) -> int:
    """The block size that takes `source_grid` to `grid` (which must divide it)."""
    if grid <= 0 or source_grid % grid:
        raise NasDoseError(f"grid {grid}: does not divide the source grid {source_grid} "
                           f"(use a divisor, e.g. {source_grid // 2} or {source_grid // 4})")
    return source_grid // grid


def _blocks(array: np.ndarray, factor: int) -> np.ndarray:
    """View a cubic array as (g, f, g, f, g, f) so that axes 1, 3, 5 run inside a block."""
    g = array.shape[0] // factor
    return array.reshape(g, factor, g, factor, g, factor)


_IN_BLOCK = (1, 3, 5)


def _any_pool(mask: np.ndarray, factor: int) -> np.ndarray:
    return cast(np.ndarray, _blocks(mask, factor).any(axis=_IN_BLOCK))  # an array: axes are left


def _mean_pool(volume: np.ndarray, factor: int) -> np.ndarray:
    return _blocks(volume, factor).mean(axis=_IN_BLOCK, dtype=np.float64).astype(np.float32)


def downsample_patient(p: Patient, factor: int) -> Patient:
    """The patient on a grid `factor` times coarser.

    CT and extra input volumes: block mean. Masks: a coarse voxel is set if any fine voxel is, so no structure can
    vanish. Dose: mean over the block's in-mask voxels, zero where the pooled mask is empty.
    The patient as it was comes along as `source` (the first one, when resampled twice).
    """
    if factor < 1 or p.grid % factor:
        raise NasDoseError(f"patient {p.id}: grid {p.grid} is not divisible by the factor {factor}")
    previous = int(p.attrs.get("resample_factor", 1))
    attrs = {**p.attrs, "resample_factor": previous * factor,
             "source_grid": int(p.attrs.get("source_grid", p.grid))}
    if factor == 1:
        return dataclasses.replace(p, attrs=attrs)
    mask = _any_pool(p.possible_dose_mask, factor)
    dose = None
    if p.dose is not None:
        inside = _blocks(p.possible_dose_mask, factor)
        total = np.where(inside, _blocks(p.dose, factor), 0).sum(axis=_IN_BLOCK, dtype=np.float64)
        count = inside.sum(axis=_IN_BLOCK)
        dose = np.divide(total, count, out=np.zeros_like(total), where=count > 0).astype(np.float32)
    return Patient(
        id=p.id,
        ct=_mean_pool(p.ct, factor),
        possible_dose_mask=mask,
        structures={name: _any_pool(s, factor) for name, s in p.structures.items()},
        voxel_mm=(p.voxel_mm[0] * factor, p.voxel_mm[1] * factor, p.voxel_mm[2] * factor),
        dose=dose,
        attrs=attrs,
        source=p.source if p.source is not None else p,
        extra={name: _mean_pool(v, factor) for name, v in p.extra.items()},
    )


def upsample(volumes: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, D, H, W) volumes on a grid `factor` times finer: trilinear between cell centres,
    clamped at the edges (what `upsample_dose` does to one dose, batched and on any device)."""
    if factor < 1:
        raise NasDoseError(f"upsampling factor {factor}: must be at least 1")
    if factor == 1:
        return volumes
    return F.interpolate(volumes, scale_factor=factor, mode="trilinear", align_corners=False)


def upsample_dose(dose: np.ndarray, factor: int, mask: np.ndarray | None = None,
                  region: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """A dose on a grid `factor` times finer: trilinear, cell-centred, non-negative (float32).

    With `region` (slices of the fine grid, steps of 1) only that box is computed, from the
    coarse cells it needs: the same values as the whole upsampled dose's box, at a fraction of
    the cost of upsampling every voxel for one training patch. With `mask` (the source-grid
    possible-dose mask, or its box) the dose is zeroed outside it.
    """
    crop, keep = _coarse_support(dose.shape, factor, region) if region is not None else (..., ...)
    volume = torch.from_numpy(np.ascontiguousarray(dose[crop], dtype=np.float32))[None, None]
    out = upsample(volume, factor)[0, 0].clamp_min(0).numpy()[keep]
    if mask is not None:
        if mask.shape != out.shape:
            raise NasDoseError(f"possible-dose mask of shape {mask.shape} does not match the "
                               f"upsampled dose's {out.shape}")
        out = np.where(mask, out, 0).astype(np.float32)
    return np.ascontiguousarray(out)


def _coarse_support(shape: tuple[int, ...], factor: int, region: tuple[slice, slice, slice]
                    ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The coarse cells a fine box's trilinear values depend on, and where the box lies in their
    upsampled crop. A fine voxel i reads the coarse cells around (i + 0.5) / factor - 0.5; the
    crop starts on a cell boundary, so the crop's fine grid is the whole grid's, shifted."""
    crop, keep = [], []
    for n, s in zip(shape, region, strict=True):
        start, stop, step = s.indices(n * factor)
        if step != 1 or stop <= start:
            raise NasDoseError(f"upsampling region {s}: expected a non-empty box with steps of 1")
        lo = max(int(np.floor((start + 0.5) / factor - 0.5)), 0)
        hi = min(int(np.floor((stop - 0.5) / factor - 0.5)) + 2, n)
        crop.append(slice(lo, hi))
        keep.append(slice(start - lo * factor, stop - lo * factor))
    return tuple(crop), tuple(keep)
