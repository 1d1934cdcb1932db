"""Training losses: the masked voxel loss, the per-sample OpenKBP dose score that validation and
the search use, and a DVH-aware term, dose-volume moments per structure.

The voxel-wise L1 loss treats a voxel in a small organ like any other, while the OpenKBP DVH
score compares per-structure statistics (targets' D99/D95/D1, OARs' D_0.1cc and mean). The
moment of order p of a structure's dose, M_p = (mean of d^p over its voxels)^(1/p), is a
differentiable summary of its DVH: p = 1 is the mean dose, large p approaches the maximum
(Jhanwar et al., "Domain knowledge driven 3D dose prediction using moment-based loss
functions", 2022, reported a better OpenKBP DVH score with such a term). The term is the mean
over samples, structures and orders of |M_p(prediction) - M_p(reference)|.

The structures are read back from the model input, so every data set and patch works without
carrying masks: the OAR channels as they are, and for the targets the regions at or above each
prescription level of the PTV channel (where PTVs overlap, the higher prescription wins there,
as in the input; the term compares prediction and reference on the same regions either way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .. import distributed
from ..config import ConfigError
from ..data.dataset import CHANNELS
from ..data.patient import DOSE_SCALE_GY, OARS, PRESCRIPTION_GY, TARGETS


@dataclass
class DVHLossConfig:
    """weight: the term's weight beside the L1 loss (0: off). powers: the moments' orders (a high
    one approaches the maximum). target_weight, oar_weight: each target's and each OAR's share of
    the term, relative (the DVH score's target criteria are D99/D95/D1, an OAR's its maximum and
    mean: raising one emphasizes those)."""

    weight: float = 0.0
    powers: tuple[float, ...] = (1.0, 2.0, 10.0)
    min_voxels: int = 8  # a structure with fewer voxels in an item (a patch's edge) is left out
    target_weight: float = 1.0
    oar_weight: float = 1.0

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"config key 'dvh_loss.weight': must be >= 0, got {self.weight}")
        if not self.powers or any(p < 1 for p in self.powers):
            raise ConfigError(f"config key 'dvh_loss.powers': orders must be >= 1, got {list(self.powers)}")
        if min(self.target_weight, self.oar_weight) < 0 or not self.target_weight + self.oar_weight > 0:
            raise ConfigError("config keys 'dvh_loss.target_weight', 'dvh_loss.oar_weight': >= 0, not both 0")


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


def dvh_moment_loss(pred: torch.Tensor, target: torch.Tensor, x: torch.Tensor,
                    cfg: DVHLossConfig) -> torch.Tensor:
    """Weighted mean |M_p(pred) - M_p(target)| over the items' structures (of at least min_voxels)
    and orders (the OARs' and the targets' weights from `cfg`)."""
    masks = structure_masks(x)
    kinds = torch.tensor([cfg.oar_weight] * len(OARS) + [cfg.target_weight] * len(TARGETS), device=masks.device)
    present = (masks.flatten(2).sum(-1) >= cfg.min_voxels).float()[..., None] * kinds[:, None]
    diff = (moments(pred, masks, cfg.powers) - moments(target, masks, cfg.powers)).abs()
    return (diff * present).sum() / (present.sum() * len(cfg.powers)).clamp_min(1e-12)


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
