"""Coarse-to-fine cascade: a full-resolution stage that refines an upsampled coarse dose.

A network trained on a coarse grid (cheap) cannot score better than its grid's resampling floor
on the source grid, where OpenKBP scores. The second stage (the approach of the OpenKBP winner's
cascaded U-Nets and of nnU-Net's cascade) sees the source-grid CT and contours plus the coarse
dose, upsampled, as an extra channel, and predicts the source-grid dose as that coarse dose plus
a learned correction (`Refiner`). It trains on source-grid patches, drawn with extra weight on
target edges and steep dose, and predicts whole volumes window by window (`refine`).

What the second stage learns from matters: coarse predictions of the coarse model's own
training patients are far better than on new patients (in-sample), so a refiner trained on them
learns to trust its input. By default it learns from the reference dose block-averaged to the
coarse grid and randomly degraded (blurred, scaled, smooth noise), so that it learns both to
restore what resampling lost and to correct a coarse dose from the anatomy; `coarse_input:
predictions` uses coarse predictions from a file instead (out-of-fold ones are the right kind:
train the coarse stage with `data.folds`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .config import ConfigError
from .data.augment import AugmentConfig, ChannelLayout, augment
from .data.dataset import IN_CHANNELS, INPUT_LAYOUT, build_input
from .data.patient import DOSE_SCALE_GY, TARGETS, Patient
from .data.resample import upsample_dose
from .data.store import DataFile, open_data
from .errors import NasDoseError

REFINER_CHANNELS = IN_CHANNELS + 1  # the model input, then the upsampled coarse dose / 70 Gy
REFINER_LAYOUT = ChannelLayout(kinds=(*INPUT_LAYOUT.kinds, "continuous"), mirror_pairs=INPUT_LAYOUT.mirror_pairs)
ITEM_KINDS: dict[str, str | ChannelLayout] = {"input": REFINER_LAYOUT, "target": "continuous", "mask": "mask"}


@dataclass
class CascadeConfig:
    """The full-resolution stage of a cascade; off while `coarse` is None.

    coarse: the coarse stage (a run folder, checkpoint or ensemble .yaml) trained on the data
    set's own grid; the refiner learns on the source grid of the same data set.
    """

    coarse: str | None = None
    patch: int = 64
    coarse_input: Literal["reference", "predictions"] = "reference"
    # With coarse_input: predictions, a prediction file (nasdose predict) holding the training
    # patients' coarse doses, best made out-of-fold (data.folds): the coarse model's predictions
    # of its own training patients are far better than at inference.
    coarse_predictions: str | None = None
    # Degradation of the reference coarse dose (coarse_input: reference), drawn per patch:
    # Gaussian blur up to `blur` coarse voxels, a smooth relative error up to `scale_error`, and
    # smooth additive noise up to `noise_gy` Gy (standard deviations).
    blur: float = 1.0
    scale_error: float = 0.08
    noise_gy: float = 3.0
    focus: float = 0.5  # share of patches centred on target edges or steep coarse dose
    val_patches: int = 2  # per validation patient, fixed, scored on the coarse model's dose
    overlap: float = 0.5  # of neighbouring windows when refining whole volumes

    def validate(self) -> None:
        if self.patch < 8 or self.patch % 8:
            raise ConfigError(f"config key 'cascade.patch': must be a multiple of 8, at least 8, got {self.patch}")
        for key in ("blur", "scale_error", "noise_gy"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'cascade.{key}': must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.focus <= 1:
            raise ConfigError(f"config key 'cascade.focus': must be in [0, 1], got {self.focus}")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"config key 'cascade.overlap': must be in [0, 1), got {self.overlap}")
        if self.coarse_input == "predictions" and self.coarse_predictions is None:
            raise ConfigError("config key 'cascade.coarse_predictions': needed with coarse_input: predictions")
        if self.val_patches < 1:
            raise ConfigError(f"config key 'cascade.val_patches': must be at least 1, got {self.val_patches}")


class Refiner(nn.Module):
    """The full-resolution stage: input channel -1 (coarse dose / 70 Gy) plus `net`'s correction.

    The last convolution of `net` starts at zero, so training starts from the coarse dose itself.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d))]
        if not convs:
            raise NasDoseError(f"{type(net).__name__}: a refiner needs a network ending in a convolution")
        nn.init.zeros_(convs[-1].weight)
        if convs[-1].bias is not None:
            nn.init.zeros_(convs[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1:] + self.net(x)


def refiner_input(patient: Patient, coarse_gy: np.ndarray) -> np.ndarray:
    """(REFINER_CHANNELS, ...) float32: the model input of a source-grid patient (or a box of
    one) and the upsampled coarse dose in Gy on the same voxels."""
    return np.concatenate([build_input(patient), (coarse_gy / np.float32(DOSE_SCALE_GY))[None]]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Training items: source-grid patches.

def _focus_voxels(p: Patient) -> np.ndarray:
    """Coarse voxels (flat indices) on a target's edge or where the dose is steepest, in the mask."""
    mask = p.possible_dose_mask
    edges = np.zeros_like(mask)
    for name in TARGETS:
        if name in p.structures:
            s = p.structures[name]
            edges |= ndimage.binary_dilation(s) & ~ndimage.binary_erosion(s)
    steep = np.zeros_like(mask)
    if p.dose is not None and mask.any():
        slope = np.linalg.norm(np.stack(np.gradient(p.dose)), axis=0)
        steep = slope >= np.quantile(slope[mask], 0.8)
    return np.flatnonzero((edges | steep) & mask)


def _box(centre: np.ndarray, patch: int, grid: int) -> tuple[slice, slice, slice]:
    start = np.clip(centre - patch // 2, 0, grid - patch)
    return tuple(slice(int(s), int(s) + patch) for s in start)  # type: ignore[return-value]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field / max(float(field.std()), 1e-8)).astype(np.float32)


def degraded(coarse: Patient, cfg: CascadeConfig, rng: np.random.Generator) -> np.ndarray:
    """The coarse reference dose (Gy), degraded the way a coarse model errs: blurred, scaled by
    a smooth factor, with smooth noise; non-negative and zero outside the coarse mask."""
    if coarse.dose is None:
        raise NasDoseError(f"patient {coarse.id}: no reference dose to learn from")
    shape = coarse.dose.shape
    dose = ndimage.gaussian_filter(coarse.dose, rng.uniform(0, cfg.blur)) if cfg.blur else coarse.dose
    dose = dose * (1 + rng.uniform(0, cfg.scale_error) * _smooth_field(rng, shape, 3.0))
    dose = dose + rng.uniform(0, cfg.noise_gy) * _smooth_field(rng, shape, 1.5)
    return np.where(coarse.possible_dose_mask, np.maximum(dose, 0), 0).astype(np.float32)


class PatchDataset(torch.utils.data.Dataset):
    """Source-grid patches of a resampled data set's patients, with the coarse dose as the last
    input channel: random ones (training; item i of epoch e drawn from (seed, e, i)) or, with
    `fixed`, the same ones every time (validation).

    `coarse_doses`: coarse-grid doses (Gy) by patient id to use as the coarse input; without
    them the degraded reference is (see `degraded`).
    """

    in_channels = REFINER_CHANNELS

    def __init__(self, path: Path, split: str, cfg: CascadeConfig, *, augment: AugmentConfig | None = None,
                 seed: int = 0, coarse_doses: dict[str, np.ndarray] | None = None,
                 fixed: bool = False) -> None:
        self.data = open_data(Path(path))
        self.ids = self.data.ids(split)
        if not self.ids:
            raise NasDoseError(f"{path}: no patients in split '{split}'")
        self.cfg, self.seed, self.fixed = cfg, seed, fixed
        self.augmentation = augment if augment is not None and augment.enabled and not fixed else None
        self.coarse_doses = coarse_doses
        self.source = self.data.source_grid(self.ids[0])
        self.factor = self.source // self.data.grid
        if cfg.patch > self.source:
            raise NasDoseError(f"{path}: cascade.patch {cfg.patch} is larger than the source grid {self.source}")
        self.per_patient = cfg.val_patches if fixed else 1
        self.epoch = 0

    @property
    def grid(self) -> int:
        """The side of an item (what the network must take)."""
        return self.cfg.patch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids) * self.per_patient

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        pid = self.ids[index // self.per_patient]
        rng = np.random.default_rng([self.seed, 0 if self.fixed else epoch, index])
        coarse = self.data.read(pid)
        if self.data.source_grid(pid) != self.source:
            raise NasDoseError(f"{self.data.path}: patient {pid} comes from a {self.data.source_grid(pid)}³ "
                               f"grid, the others from {self.source}³")
        focus = _focus_voxels(coarse)
        candidates = focus if len(focus) and rng.random() < self.cfg.focus else np.flatnonzero(coarse.possible_dose_mask)
        if not len(candidates):
            candidates = np.arange(coarse.possible_dose_mask.size)
        cell = np.array(np.unravel_index(int(rng.choice(candidates)), coarse.possible_dose_mask.shape))
        box = _box(cell * self.factor + rng.integers(0, self.factor, 3), self.cfg.patch, self.source)
        fine = self.data.read_source(pid, box)
        if fine.dose is None:
            raise NasDoseError(f"{self.data.path}: patient {pid} has no reference dose to learn from")
        coarse_gy = self.coarse_doses[pid] if self.coarse_doses is not None else degraded(coarse, self.cfg, rng)
        coarse_up = upsample_dose(coarse_gy, self.factor)[box] * fine.possible_dose_mask
        mask = fine.possible_dose_mask.astype(np.float32)[None]
        arrays = {"input": refiner_input(fine, coarse_up),
                  "target": (fine.dose / np.float32(DOSE_SCALE_GY))[None] * mask, "mask": mask}
        if self.augmentation is not None:
            arrays = augment(arrays, ITEM_KINDS, self.augmentation, rng)
            arrays["target"] = arrays["target"] * arrays["mask"]
        return {**{k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in arrays.items()},
                "labeled": torch.tensor(1.0), "id": pid}


# ---------------------------------------------------------------------------------------------
# Inference: whole source-grid volumes, window by window.

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
    boxes = [(a, b, c) for a in _starts(size[0], sides[0], step[0]) for b in _starts(size[1], sides[1], step[1])
             for c in _starts(size[2], sides[2], step[2])]
    boxes = [tuple(slice(s, s + w) for s, w in zip(corner, sides)) for corner in boxes]
    if mask is not None:
        boxes = [b for b in boxes if mask[b].any()]
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        y = refiner(torch.cat([x[(0, slice(None), *b)][None] for b in chunk])).float()
        for b, yi in zip(chunk, y):
            total[b] += yi[0] * weight
            norm[b] += weight
    coarse = x[0, -1].float()
    return torch.where(norm > 0, total / norm.clamp_min(1e-8), coarse)[None, None]


def predict_source(refiner: nn.Module, patient: Patient, coarse_gy: np.ndarray, factor: int,
                   cfg: CascadeConfig, device: torch.device) -> np.ndarray:
    """The source-grid dose (Gy) of `patient` (read on the source grid) from its coarse dose:
    non-negative and zero outside the possible-dose mask, like every nasdose prediction."""
    mask = patient.possible_dose_mask
    coarse_up = upsample_dose(coarse_gy, factor, mask)
    x = torch.from_numpy(refiner_input(patient, coarse_up))[None].to(device)
    with torch.inference_mode():
        y = refine(refiner, x, cfg.patch, cfg.overlap, torch.from_numpy(mask).to(device))
    dose = y[0, 0].cpu().numpy() * DOSE_SCALE_GY
    return np.where(mask, np.maximum(dose, 0), 0).astype(np.float32)


def source_grids(data: DataFile, ids: Sequence[str]) -> int:
    """The one factor from `data`'s grid to its patients' source grid (an error when mixed)."""
    factors = {data.source_grid(pid) // data.grid for pid in ids}
    if len(factors) != 1:
        raise NasDoseError(f"{data.path}: patients come from different source grids")
    return factors.pop()
