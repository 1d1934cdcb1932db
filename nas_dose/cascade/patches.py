"""The cascade's configuration and its training items: source-grid patches whose extra channel is a
coarse dose (degraded reference, or the coarse model's predictions)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from scipy import ndimage

from ..config import ConfigError, at_least
from ..data.augment import AugmentConfig, ChannelLayout, augment
from ..data.dataset import INPUT_LAYOUT, build_input
from ..data.patient import DOSE_SCALE_GY, TARGETS, Patient
from ..data.resample import upsample_dose
from ..data.store import open_data
from ..errors import NasDoseError
from ..models.refiner import REFINER_CHANNELS

REFINER_LAYOUT = ChannelLayout(kinds=(*INPUT_LAYOUT.kinds, "continuous"), mirror_pairs=INPUT_LAYOUT.mirror_pairs)
ITEM_KINDS: dict[str, str | ChannelLayout] = {"input": REFINER_LAYOUT, "target": "continuous", "mask": "mask",
                                              "teacher": "continuous"}


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
        at_least("cascade.val_patches", self.val_patches, 1)

    def resolved(self) -> CascadeConfig:
        """This config with `coarse` and `coarse_predictions` absolute: taken from the working
        directory, as every config path, and recorded so, so that a run (its config.yaml and
        checkpoints) still finds its coarse stage when resumed or predicted from elsewhere."""
        return replace(self, coarse=absolute(self.coarse), coarse_predictions=absolute(self.coarse_predictions))


PATH_KEYS = ("coarse", "coarse_predictions")  # CascadeConfig's paths (`CascadeConfig.resolved`)


def absolute(path: str | None) -> str | None:
    """A config path taken from the working directory, absolute; None stays None."""
    return None if path is None else str(Path(path).resolve())


def recorded_absolute(cascade: dict[str, Any]) -> dict[str, Any]:
    """A recorded `cascade` section with its paths absolute, as `resolved` records them today:
    runs recorded before that kept them as given, and resume where they name the same."""
    return {**cascade, **{k: absolute(cascade[k]) for k in PATH_KEYS if k in cascade}}


def refiner_input(patient: Patient, coarse_gy: np.ndarray) -> np.ndarray:
    """(REFINER_CHANNELS, ...) float32: the model input of a source-grid patient (or a box of
    one) and the upsampled coarse dose in Gy on the same voxels."""
    return np.concatenate([build_input(patient), (coarse_gy / np.float32(DOSE_SCALE_GY))[None]]).astype(np.float32)


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

    `ids`: these patients, in this order, instead of the split's. `coarse_doses`: coarse-grid
    doses (Gy) by patient id to use as the coarse input; a patient without one gets the degraded
    reference (see `degraded`). `teacher`: a prediction file on the source
    grid (a distillation's teacher cache); its dose in the same box, moved by the same transform,
    is the item's `teacher` (dose / 70).
    """

    in_channels = REFINER_CHANNELS

    def __init__(self, path: Path, split: str, cfg: CascadeConfig, *, augment: AugmentConfig | None = None,
                 seed: int = 0, coarse_doses: dict[str, np.ndarray] | None = None,
                 fixed: bool = False, teacher: Path | None = None, ids: Sequence[str] | None = None) -> None:
        self.data = open_data(Path(path))
        if self.data.extra_channels:  # on the data set's grid only, not on the source grid
            raise NasDoseError(f"{path}: a cascade's full-resolution stage cannot take the extra input channels "
                               f"({', '.join(self.data.extra_channels)})")
        self.ids = self.data.ids(split) if ids is None else list(ids)
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
        self.teacher = open_data(teacher) if teacher is not None else None
        if self.teacher is not None:
            missing = [pid for pid in self.ids if pid not in self.teacher]
            if self.teacher.kind != "predictions" or self.teacher.grid != self.source or missing:
                raise NasDoseError(f"{teacher}: holds no teacher prediction on the {self.source}³ source grid of "
                                   f"patient(s) {', '.join(missing[:3]) or 'of the data set'}")

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
        use_focus = len(focus) and rng.random() < self.cfg.focus
        candidates = focus if use_focus else np.flatnonzero(coarse.possible_dose_mask)
        if not len(candidates):
            candidates = np.arange(coarse.possible_dose_mask.size)
        cell = np.array(np.unravel_index(int(rng.choice(candidates)), coarse.possible_dose_mask.shape))
        box = _box(cell * self.factor + rng.integers(0, self.factor, 3), self.cfg.patch, self.source)
        fine = self.data.read_source(pid, box)
        if fine.dose is None:
            raise NasDoseError(f"{self.data.path}: patient {pid} has no reference dose to learn from")
        given = self.coarse_doses.get(pid) if self.coarse_doses is not None else None
        coarse_gy = given if given is not None else degraded(coarse, self.cfg, rng)
        coarse_up = upsample_dose(coarse_gy, self.factor, fine.possible_dose_mask, region=box)
        mask = fine.possible_dose_mask.astype(np.float32)[None]
        arrays = {"input": refiner_input(fine, coarse_up),
                  "target": (fine.dose / np.float32(DOSE_SCALE_GY))[None] * mask, "mask": mask}
        if self.teacher is not None:
            arrays["teacher"] = (self.teacher.read_dose(pid, box) / np.float32(DOSE_SCALE_GY))[None] * mask
        if self.augmentation is not None:
            arrays = augment(arrays, ITEM_KINDS, self.augmentation, rng)
            for name in ("target", "teacher"):
                if name in arrays:
                    arrays[name] = arrays[name] * arrays["mask"]
        return {**{k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in arrays.items()},
                "labeled": torch.tensor(1.0), "id": pid}
