"""Whole-volume inference of a cascade's full-resolution stage: overlapping windows of the patch side it
trained on, blended with Gaussian weights (as nnU-Net)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data.patient import DOSE_SCALE_GY, Patient
from ..data.resample import upsample_dose
from ..data.store import DataFile
from ..data.tta import flip_tta
from ..errors import NasDoseError
from .patches import CascadeConfig, refiner_input


def _starts(size: int, window: int, step: int) -> list[int]:
    starts = list(range(0, max(size - window, 0) + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _window_weight(window: int) -> torch.Tensor:
    """Gaussian importance (sigma = window / 8, as nnU-Net): a window's centre counts most,
    so seams between windows do not show."""
    axis = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-axis.square() / (2 * (window / 8) ** 2))
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return (w / w.max()).clamp_min(1e-3)


def refine(refiner: nn.Module, x: torch.Tensor, window: int, overlap: float = 0.5,
           mask: torch.Tensor | None = None, batch: int = 2) -> torch.Tensor:
    """The refiner's prediction for a whole (1, C, D, H, W) input, from overlapping windows of
    the side it was trained on (statistics such as instance norm's then match training).
    Windows without a voxel of `mask` keep the coarse dose (the input's last channel)."""
    if x.shape[0] != 1:
        raise ValueError("refine: one volume at a time")
    size = x.shape[2:]
    sides = [min(window, s) for s in size]
    step = [max(1, int(round(w * (1 - overlap)))) for w in sides]
    weight = _window_weight(window).to(x.device)[:sides[0], :sides[1], :sides[2]]
    total = torch.zeros(size, device=x.device)
    norm = torch.zeros(size, device=x.device)
    corners = [(a, b, c) for a in _starts(size[0], sides[0], step[0]) for b in _starts(size[1], sides[1], step[1])
               for c in _starts(size[2], sides[2], step[2])]
    boxes = [tuple(slice(s, s + w) for s, w in zip(corner, sides)) for corner in corners]
    if mask is not None:
        boxes = [b for b in boxes if mask[b].any()]
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        y = refiner(torch.cat([x[:, :, d, h, w] for d, h, w in chunk])).float()
        for b, yi in zip(chunk, y):
            total[b] += yi[0] * weight
            norm[b] += weight
    coarse = x[0, -1].float()
    return torch.where(norm > 0, total / norm.clamp_min(1e-8), coarse)[None, None]


def predict_source(refiner: nn.Module, patient: Patient, coarse_gy: np.ndarray, factor: int,
                   cfg: CascadeConfig, device: torch.device, tta: bool = False) -> np.ndarray:
    """The source-grid dose (Gy) of `patient` (read on the source grid) from its coarse dose:
    non-negative and zero outside the possible-dose mask, like every nasdose prediction. `tta`
    averages the whole refinement over the flips of the patient (4 times the work)."""
    mask = patient.possible_dose_mask
    coarse_up = upsample_dose(coarse_gy, factor, mask)
    x = torch.from_numpy(refiner_input(patient, coarse_up))[None].to(device)

    def whole(xm: torch.Tensor) -> torch.Tensor:
        # The mask rides along as the last channel, so that it is flipped with the patient.
        return refine(refiner, xm[:, :-1], cfg.patch, cfg.overlap, xm[0, -1] > 0)

    with torch.inference_mode():
        xm = torch.cat([x, torch.from_numpy(mask).to(device, x.dtype)[None, None]], dim=1)
        y = flip_tta(whole, xm) if tta else whole(xm)
    dose = y[0, 0].cpu().numpy() * DOSE_SCALE_GY
    return np.where(mask, np.maximum(dose, 0), 0).astype(np.float32)


def source_grids(data: DataFile, ids: Sequence[str]) -> int:
    """The one factor from `data`'s grid to its patients' source grid (an error when mixed)."""
    factors = {data.source_grid(pid) // data.grid for pid in ids}
    if len(factors) != 1:
        raise NasDoseError(f"{data.path}: patients come from different source grids")
    return factors.pop()
