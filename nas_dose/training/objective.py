"""What a training step minimizes, as a pluggable object (distillation and cascades subclass it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import ConfigError
from ..data.dataset import DoseDataset, EpochDataset, PlanDataset, TrainingSet
from ..data.store import open_data
from ..runtime import Runtime
from .config import CONSISTENCY_NEEDS, TrainConfig
from .losses import ConsistencyConfig, DVHLossConfig, consistency_loss, dvh_moment_loss, masked_loss


class Objective:
    """What a training step minimizes: by default the masked loss of the prediction to the
    target (`TrainConfig.loss`). Other objectives (distillation) subclass it, and may

    - train on items with more arrays: `train_set` returns the training dataset;
    - add terms from the batch and from the model's features (hooks placed in `bind`);
    - train modules of their own: `parameters()` are stepped with the model's, by its optimizer
      and schedule; a module with an optimizer of its own is stepped by the objective in `loss`;
    - carry state across an interruption: `state_dict()` enters every training checkpoint and
      is handed back to `load_state_dict` on resume, so such a run resumes exactly too;
    - report terms: `log_terms()` (means since its last call) joins each log entry.
    """

    kind: Literal["l1", "mse"] = "l1"
    dvh = DVHLossConfig()
    consistency = ConsistencyConfig()

    def train_set(self, data: Path, config: TrainConfig) -> TrainingSet:
        with open_data(data) as d:
            held_out = config.data.held_out(d.ids(config.data.train_split))
        if config.data.plans:
            return PlanDataset(data, config.data.train_split, augment=config.data.augment, seed=config.seed,
                               exclude=held_out, preferences=config.model.conditioning is not None,
                               hide=config.data.hide)
        return DoseDataset(data, config.data.train_split, augment=config.data.augment, seed=config.seed,
                           exclude=held_out, hide=config.data.hide)

    def val_set(self, data: Path, config: TrainConfig) -> EpochDataset:
        """What the checkpoint is chosen on (the validation patients, whole; every plan of each)."""
        if config.data.plans:
            return PlanDataset(data, config.data.val_split, every_plan=True,
                               preferences=config.model.conditioning is not None, hide=config.data.hide)
        return DoseDataset(data, config.data.val_split, hide=config.data.hide)

    def bind(self, model: nn.Module, runtime: Runtime, config: TrainConfig) -> None:
        """Called once the model is on the runtime's device, before its optimizer is made."""
        if config.consistency.weight and config.model.conditioning is None:
            raise ConfigError(CONSISTENCY_NEEDS)
        self.kind, self.dvh, self.consistency = config.loss, config.dvh_loss, config.consistency

    def parameters(self) -> list[nn.Parameter]:
        return []

    def loss(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The loss to minimize, given the model's prediction for `batch` (on the device)."""
        loss = masked_loss(pred, batch["target"], batch["mask"], self.kind)
        if self.dvh.weight:
            loss = loss + self.dvh.weight * dvh_moment_loss(pred * batch["mask"], batch["target"],
                                                            batch["input"], self.dvh)
        if self.consistency.weight:  # `train.consistency`: the dose obeys the preferences asked
            loss = loss + self.consistency.weight * consistency_loss(pred * batch["mask"], batch["target"],
                                                                     batch["input"], batch["preferences"],
                                                                     self.consistency)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (an empty dict from a checkpoint without one)."""

    def log_terms(self) -> dict[str, float]:
        return {}
