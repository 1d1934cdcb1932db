"""Training losses: the masked voxel loss, the per-sample OpenKBP dose score that validation and
the search use, and a DVH-aware term, dose-volume moments per structure.

The voxel-wise L1 loss treats a voxel in a small organ like any other, while the OpenKBP DVH
score compares per-structure statistics (targets' D99/D95/D1, OARs' D_0.1cc and mean). The
moment of order p of a structure's dose, M_p = (mean of d^p over its voxels)^(1/p), is a
differentiable summary of its DVH: p = 1 is the mean dose, large p approaches the maximum
(Jhanwar et al., "Domain knowledge driven 3D dose prediction using moment-based loss
functions", 2022, reported a better OpenKBP DVH score with such a term). Moments of order >= 1
summarize a structure's mean and hot end, not a target's cold end, where the score's D99 and D95
lie; `target_points` adds those DVH points themselves (a target's dose quantiles, with linear
interpolation, so their gradient reaches the voxels at those order statistics). The term is the
mean over samples, structures and orders (and targets and points) of |M_p(prediction) -
M_p(reference)| (and |D_x(prediction) - D_x(reference)|).

The structures are read back from the model input, so every data set and patch works without
carrying masks: the OAR channels as they are, and for the targets the regions at or above each
prescription level of the PTV channel (where PTVs overlap, the higher prescription wins there,
as in the input; the term compares prediction and reference on the same regions either way).

The objective-consistency term (`consistency_loss`, for a model conditioned on the planning
preferences) asks the predicted dose to obey the preferences it was asked for, in the terms the
preferences are defined in (`nas_dose.data.preferences`):

- ``hi``: the homogeneity index (D2 - D98) / D50 of the predicted PTV70 dose against the asked
  ``hi``. The D's are exact quantiles of the PTV70 voxels' doses with linear interpolation, the
  estimator that measured the plans' ``hi`` (`homogeneity_index`), so a prediction equal to the
  (unaugmented) plan scores zero; its gradient reaches the voxels at those order statistics only.
  The prediction is clamped at 0 (as it is written) and D50 floored at half the prescription,
  so a cold prediction (a fresh network's, near zero) cannot blow the ratio up.
- ``oar``: a plan's sparing weight shows in the dose as the mean dose of each spared OAR outside
  the targets (`spared_mean_doses`: it falls as ``oar`` rises), and the weight maps to no dose
  by itself (it depends on the anatomy), so the target is the asked plan's own: the term is
  |mean predicted dose - mean plan dose| per spared OAR outside the targets, a first-order
  DVH-moment term on those structures (in dose / 70 units, as the L1 loss).

Its value is the weighted mean of the items' HI errors (weight `hi_weight`) and the spared OARs'
mean-dose errors (weight `oar_weight` each).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .. import distributed
from ..config import ConfigError
from ..data.dataset import CHANNELS
from ..data.patient import DOSE_SCALE_GY, OARS, PRESCRIPTION_GY, TARGETS
from ..data.preferences import NAMES, SPARED_OARS


@dataclass
class DVHLossConfig:
    """weight: the term's weight beside the L1 loss (0: off). powers: the moments' orders (a high
    one approaches the maximum). target_points: DVH points D_x of each target compared as well
    (x: the percentage of the target's volume receiving at least that dose; the score's are 99,
    95 and 1). target_weight, oar_weight: each target's and each OAR's share of the term,
    relative (the DVH score's target criteria are D99/D95/D1, an OAR's its maximum and mean:
    raising one emphasizes those)."""

    weight: float = 0.0
    powers: tuple[float, ...] = (1.0, 2.0, 10.0)
    target_points: tuple[float, ...] = ()
    min_voxels: int = 8  # a structure with fewer voxels in an item (a patch's edge) is left out
    target_weight: float = 1.0
    oar_weight: float = 1.0

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"config key 'dvh_loss.weight': must be >= 0, got {self.weight}")
        if any(p < 1 for p in self.powers):
            raise ConfigError(f"config key 'dvh_loss.powers': orders must be >= 1, got {list(self.powers)}")
        if any(not 0 < x < 100 for x in self.target_points):
            raise ConfigError(f"config key 'dvh_loss.target_points': percentages in (0, 100), "
                              f"got {list(self.target_points)}")
        if not self.powers and not self.target_points:
            raise ConfigError("config keys 'dvh_loss.powers', 'dvh_loss.target_points': not both empty")
        if self.target_points and not self.target_weight > 0:
            raise ConfigError("config key 'dvh_loss.target_points': needs dvh_loss.target_weight > 0")
        if min(self.target_weight, self.oar_weight) < 0 or not self.target_weight + self.oar_weight > 0:
            raise ConfigError("config keys 'dvh_loss.target_weight', 'dvh_loss.oar_weight': >= 0, not both 0")


@dataclass
class ConsistencyConfig:
    """weight: the objective-consistency term's weight beside the L1 loss (0: off; a conditioned
    model only). hi_weight, oar_weight: the shares of the HI error and of each spared OAR's mean
    dose error in the term, relative. min_voxels: a PTV70 or spared OAR with fewer voxels in an
    item is left out."""

    weight: float = 0.0
    hi_weight: float = 1.0
    oar_weight: float = 1.0
    min_voxels: int = 8

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"config key 'consistency.weight': must be >= 0, got {self.weight}")
        if min(self.hi_weight, self.oar_weight) < 0 or not self.hi_weight + self.oar_weight > 0:
            raise ConfigError("config keys 'consistency.hi_weight', 'consistency.oar_weight': >= 0, not both 0")
        if self.min_voxels < 1:
            raise ConfigError(f"config key 'consistency.min_voxels': must be >= 1, got {self.min_voxels}")


_PTV = CHANNELS.index("ptv")
_OAR_CHANNELS = [CHANNELS.index(name) for name in OARS]
# Half-way below each level: the PTV channel holds exactly PRESCRIPTION / DOSE_SCALE_GY.
_TARGET_LEVELS = [PRESCRIPTION_GY[name] / DOSE_SCALE_GY - 0.05 for name in TARGETS]


def structure_masks(x: torch.Tensor) -> torch.Tensor:
    """(N, S, D, H, W) float masks of the OARs and of the PTV regions, from a model input."""
    ptv = x[:, _PTV]
    targets = [(ptv >= level).float() for level in _TARGET_LEVELS]
    return torch.cat([x[:, _OAR_CHANNELS].float().round(), torch.stack(targets, 1)], 1)


def moments(dose: torch.Tensor, masks: torch.Tensor, powers: tuple[float, ...]) -> torch.Tensor:
    """(N, S, P): M_p of `dose` (N, 1, ...) over each of the (N, S, ...) masks."""
    d = dose.float().clamp_min(0)
    voxels = masks.flatten(2).sum(-1).clamp_min(1)
    out = []
    for p in powers:
        mean = (d.pow(p) * masks).flatten(2).sum(-1) / voxels
        out.append((mean + 1e-12).pow(1 / p))
    return torch.stack(out, -1)


def dvh_points(dose: torch.Tensor, masks: torch.Tensor, points: tuple[float, ...]) -> torch.Tensor:
    """(N, S, P): D_x for each x in `points` of `dose` (N, ...) over each of the (N, S, ...) 0/1
    masks: the (100 - x) % quantile of the structure's doses, linearly interpolated as
    `torch.quantile`, differentiable in `dose`; 0 for a structure without voxels. One sort over
    the batch, with no host-device sync (the structures differ in size)."""
    inside = masks.flatten(2) > 0.5
    doses = dose.float().clamp_min(0).flatten(1)[:, None].expand_as(inside)
    ordered = torch.where(inside, doses, torch.inf).sort(-1).values
    count = inside.sum(-1, keepdim=True)
    q = torch.tensor([1 - x / 100 for x in points], device=dose.device)
    pos = q * (count - 1).clamp_min(0)
    low, high = pos.floor().long(), pos.ceil().long()
    a, b = ordered.gather(-1, low), ordered.gather(-1, high)
    return torch.where(count > 0, a + (b - a) * (pos - low), 0.0)


def dvh_moment_loss(pred: torch.Tensor, target: torch.Tensor, x: torch.Tensor,
                    cfg: DVHLossConfig) -> torch.Tensor:
    """Weighted mean |M_p(pred) - M_p(target)| over the items' structures (of at least min_voxels)
    and orders, and |D_x(pred) - D_x(target)| over their targets and `target_points` (the OARs'
    and the targets' weights from `cfg`)."""
    masks = structure_masks(x)
    kinds = torch.tensor([cfg.oar_weight] * len(OARS) + [cfg.target_weight] * len(TARGETS), device=masks.device)
    present = (masks.flatten(2).sum(-1) >= cfg.min_voxels).float() * kinds
    total = pred.new_zeros((), dtype=torch.float32)
    if cfg.powers:
        diff = (moments(pred, masks, cfg.powers) - moments(target, masks, cfg.powers)).abs()
        total = total + (diff * present[..., None]).sum()
    count = present.sum() * len(cfg.powers)
    if cfg.target_points:
        targets, weights = masks[:, len(OARS):], present[:, len(OARS):]
        gap = dvh_points(pred[:, 0], targets, cfg.target_points) - dvh_points(target[:, 0], targets, cfg.target_points)
        total = total + (gap.abs() * weights[..., None]).sum()
        count = count + weights.sum() * len(cfg.target_points)
    return total / count.clamp_min(1e-12)


_HI = NAMES.index("hi")
_PTV70 = len(OARS) + TARGETS.index("PTV70")  # its mask in `structure_masks`
_SPARED = [OARS.index(name) for name in SPARED_OARS]
_D50_FLOOR = 0.5 * PRESCRIPTION_GY["PTV70"] / DOSE_SCALE_GY  # half the PTV70's prescription, dose / 70


def homogeneity(dose: torch.Tensor, mask: torch.Tensor, d50_floor: float = 1e-6) -> torch.Tensor:
    """(N,): (D2 - D98) / D50 of each item's `dose` (N, ..., clamped at 0) over its `mask` (N, ...,
    0/1), as `homogeneity_index` measures it (linear-interpolation quantiles), differentiable in
    `dose`; D50 taken as at least `d50_floor`."""
    d2, d50, d98 = dvh_points(dose, mask[:, None], (2.0, 50.0, 98.0))[:, 0].unbind(-1)
    return (d2 - d98) / d50.clamp_min(d50_floor)


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, x: torch.Tensor, preferences: torch.Tensor,
                     cfg: ConsistencyConfig) -> torch.Tensor:
    """The objective-consistency term (module docstring): the weighted mean of |HI(pred's PTV70) -
    asked hi| per item and |mean pred - mean plan| per spared OAR outside the targets, for
    predictions `pred` of the plans `target` (N, 1, ...) asked for `preferences` (N, len(NAMES))."""
    masks = structure_masks(x)
    outside = (x[:, _PTV] <= 0).float()[:, None]
    oars = masks[:, _SPARED] * outside
    present = (oars.flatten(2).sum(-1) >= cfg.min_voxels).float() * cfg.oar_weight
    means = moments(pred, oars, (1.0,))[..., 0] - moments(target, oars, (1.0,))[..., 0]
    total, weights = (means.abs() * present).sum(), present.sum()
    if cfg.hi_weight:
        ptv70 = masks[:, _PTV70]
        counted = (ptv70.flatten(1).sum(-1) >= cfg.min_voxels).float() * cfg.hi_weight
        error = (homogeneity(pred[:, 0], ptv70, _D50_FLOOR) - preferences[:, _HI].float()).abs()
        total, weights = total + (error * counted).sum(), weights + counted.sum()
    return total / weights.clamp_min(1e-12)


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                kind: Literal["l1", "mse"] = "l1", weight: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean error inside the possible-dose mask: summed over the batch, divided by its mask voxels.
    `weight` (broadcast against the error) scales voxels or samples without changing the divisor."""
    diff = pred.float() - target
    err = diff.abs() if kind == "l1" else diff.square()
    if weight is not None:
        err = err * weight
    return (err * mask).sum() / mask.sum().clamp_min(1)


def dose_errors_gy(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OpenKBP dose score of each sample (Gy): the prediction, non-negative and zeroed outside the
    mask as `nasdose predict` writes it, against the whole target, per mask voxel."""
    pred = pred.float().clamp_min(0) * mask
    dims = tuple(range(1, pred.dim()))
    return (pred - target).abs().sum(dims) / mask.sum(dims).clamp_min(1) * DOSE_SCALE_GY


def share_weight(mask: torch.Tensor) -> torch.Tensor:
    """The factor of a rank's loss (a mean over its share of the batch's mask voxels) that makes
    the ranks' losses, averaged as DDP averages gradients, the mean over the whole batch's mask
    voxels: world size × the rank's fraction of those voxels. Collective."""
    voxels = mask.sum()
    return voxels * distributed.world_size() / distributed.all_reduce(voxels.detach().clone()).clamp_min(1)
