"""The training configuration: what a run depends on, saved as its config.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..cascade.patches import CascadeConfig
from ..config import ConfigError, at_least
from ..data.augment import AugmentConfig
from ..models.factory import ModelConfig
from ..runtime import RuntimeConfig
from .events import LoggingConfig
from .losses import ConsistencyConfig, DVHLossConfig


@dataclass
class DataConfig:
    train_split: str = "train"
    val_split: str = "validation"
    batch_size: int = 2
    # Loader worker processes; None picks by device (runtime.default_loader_workers): 0 on a CPU,
    # where loading in the training process measured faster, all but two cores (at most 12) with CUDA.
    # Either way cut to the workers whose batches fit in /dev/shm (the run says so when it cuts).
    num_workers: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Cross-validation folds of the training split: with folds > 1 the run trains on all of it
    # but fold `fold` (every folds-th patient, from the fold-th, in the data set's order), whose
    # predictions are then out-of-fold (what a cascade's second stage should learn from).
    folds: int = 1
    fold: int = 0
    # Train on the patients' preference plans (`data synth --preferences K`), one drawn per
    # patient and epoch, and validate on all of them; a conditioned model is asked for each
    # plan's preferences.
    plans: bool = False
    # Extra input channels of the data set the model does not take (`data synth --beam-plates`'s
    # beam_plate, say): a network to compare with one that sees them, or a student whose
    # privileged teacher alone sees them (distill's `concurrent.privileged`).
    hide: list[str] = field(default_factory=list)

    def held_out(self, ids: list[str]) -> list[str]:
        """The training patients of `ids` this run leaves out (none without folds)."""
        return ids[self.fold::self.folds] if self.folds > 1 else []

    def validate(self) -> None:
        at_least("data.batch_size", self.batch_size, 1)
        at_least("data.folds", self.folds, 1)
        if not 0 <= self.fold < self.folds:
            raise ConfigError(f"config key 'data.fold': must be in [0, {self.folds - 1}], got {self.fold}")
        if self.num_workers is not None:
            at_least("data.num_workers", self.num_workers, 0)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    grad_clip: float | None = None

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"config key 'optim.lr': must be positive, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"config key 'optim.grad_clip': must be positive, got {self.grad_clip}")


@dataclass
class ScheduleConfig:
    """Learning-rate factor per optimizer step: linear warmup, then constant, cosine or step decay."""

    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    step_epochs: int = 30
    gamma: float = 0.5

    def validate(self) -> None:
        at_least("schedule.warmup_steps", self.warmup_steps, 0)
        at_least("schedule.step_epochs", self.step_epochs, 1)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"config key 'schedule.min_lr_ratio': must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class PriorConfig:
    """Stage I of a dose prior (FDP): before training, the model's dose autoencoder (`prior_of`
    its registered name) learns to reconstruct the training doses (every plan's, with
    `data.plans`) for `epochs`, with the run's data, optimizer and schedule, into RUN/prior/; the
    model's decoder then starts from the autoencoder's (stage II). `freeze` keeps that decoder
    fixed (FiLM heads still learn); `latent_weight` adds the L1 distance between the model's
    latent and the autoencoder's latent of the target dose (nas_dose/training/prior.py)."""

    epochs: int = 0
    freeze: bool = False
    latent_weight: float = 0.0

    def validate(self) -> None:
        at_least("prior.epochs", self.epochs, 0)
        if not self.latent_weight >= 0:
            raise ConfigError(f"config key 'prior.latent_weight': must be >= 0, got {self.latent_weight}")
        if not self.epochs and (self.freeze or self.latent_weight):
            raise ConfigError("config key 'prior.epochs': prior.freeze and prior.latent_weight need a dose prior "
                              "(prior.epochs > 0)")


CONSISTENCY_NEEDS = ("config key 'consistency.weight': the term compares the dose with the preferences asked, "
                     "for a conditioned model only (set model.conditioning=film and data.plans=true)")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as the run's config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    epochs: int = 40
    steps_per_epoch: int | None = None
    val_every: int = 1
    patience: int | None = None
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    loss: Literal["l1", "mse"] = "l1"
    dvh_loss: DVHLossConfig = field(default_factory=DVHLossConfig)
    # The objective-consistency term (a conditioned model's dose obeys the asked preferences:
    # PTV70 HI against `hi`, spared OAR means against the plan's; training/losses.py).
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        for key in ("epochs", "val_every", "checkpoint_every", "log_every"):
            at_least(key, getattr(self, key), 1)
        if self.steps_per_epoch is not None:
            at_least("steps_per_epoch", self.steps_per_epoch, 1)
        if self.patience is not None:
            at_least("patience", self.patience, 1)
        if self.model.conditioning is not None and not self.data.plans:
            raise ConfigError("config key 'model.conditioning': a conditioned model learns from preference plans: "
                              "set data.plans=true (data from `nasdose data synth --preferences K`)")
        # The model's conditioning is checked where it is known (`Objective.bind`): an ensemble's
        # members take it from the ensemble's `conditioning`, not from this section's `model`.
        if self.consistency.weight and not self.data.plans:
            raise ConfigError(CONSISTENCY_NEEDS)
        if self.prior.epochs and self.cascade.coarse is not None:
            raise ConfigError("config key 'prior.epochs': a cascade's full-resolution stage has no dose prior "
                              "(its decoder refines a coarse dose)")

