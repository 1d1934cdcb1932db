"""Train one network (a registered reference model or a searched genotype) on a nasdose data set.

  nasdose train --data DATA.h5 --out RUN [--config CFG.yaml] [--resume] [key=value ...]

RUN receives config.yaml (the resolved config), log.jsonl, metrics.json, best.pt (the weights
with the best validation dose score) and checkpoints/last.pt, written every `checkpoint_every`
steps and at each epoch end; `--resume` continues from it exactly where the run stopped. The
model is chosen and training stops early on the validation split only, never on test patients.

Started by torchrun the run is data-parallel (DDP): data.batch_size is the global batch, each
rank steps on its share, validation is shared out and summed, and rank 0 writes the files
(docs/DISTRIBUTED.md); the result is that of one process up to rounding.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .config import (
    ConfigError,
    add_config_arguments,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from .data.augment import AugmentConfig
from .data.dataset import IN_CHANNELS, DoseDataset, make_loader
from . import distributed
from .data.patient import DOSE_SCALE_GY
from .errors import NasDoseError, input_error
from .io import atomic_path, load_checkpoint, load_json, output_folder, save_checkpoint, save_json
from .data.store import DataFile, open_data
from .progress import progress, say
from .runtime import Runtime, RuntimeConfig, rng_state, seed_everything, set_rng_state
from .cascade import REFINER_CHANNELS, CascadeConfig, PatchDataset, Refiner
from .losses import DVHLossConfig, dvh_moment_loss
from .search_spaces.measure import meta_copy, meta_forward

CHECKPOINT_FORMAT = "nasdose-checkpoint"


@dataclass
class ModelConfig:
    """A registered model (`name` with `kwargs`) or, when `genotype` is a file, a searched network."""

    name: str = "unet3d"
    kwargs: dict[str, Any] = field(default_factory=dict)
    genotype: str | None = None

    def validate(self) -> None:
        if self.genotype is not None and self.kwargs:
            raise ConfigError("config key 'model.kwargs': a genotype model takes no kwargs")


@dataclass
class DataConfig:
    train_split: str = "train"
    val_split: str = "validation"
    batch_size: int = 2
    # Loader worker processes; None picks by device (Runtime.loader_workers): 0 on a CPU, where
    # loading in the training process measured faster, min(4, cores // 2) with CUDA.
    num_workers: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Cross-validation folds of the training split: with folds > 1 the run trains on all of it
    # but fold `fold` (every folds-th patient, from the fold-th, in the data set's order), whose
    # predictions are then out-of-fold (what a cascade's second stage should learn from).
    folds: int = 1
    fold: int = 0

    def held_out(self, ids: list[str]) -> list[str]:
        """The training patients of `ids` this run leaves out (none without folds)."""
        return ids[self.fold::self.folds] if self.folds > 1 else []

    def validate(self) -> None:
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.folds", self.folds, 1)
        if not 0 <= self.fold < self.folds:
            raise ConfigError(f"config key 'data.fold': must be in [0, {self.folds - 1}], got {self.fold}")
        if self.num_workers is not None:
            _at_least("data.num_workers", self.num_workers, 0)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    momentum: float = 0.9
    grad_clip: float | None = None

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"config key 'optim.lr': must be positive, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"config key 'optim.betas': expected 2 numbers, got {len(self.betas)}")
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
        _at_least("schedule.warmup_steps", self.warmup_steps, 0)
        _at_least("schedule.step_epochs", self.step_epochs, 1)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"config key 'schedule.min_lr_ratio': must be in [0, 1], got {self.min_lr_ratio}")


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
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    def validate(self) -> None:
        for key in ("epochs", "val_every", "checkpoint_every", "log_every"):
            _at_least(key, getattr(self, key), 1)
        if self.steps_per_epoch is not None:
            _at_least("steps_per_epoch", self.steps_per_epoch, 1)
        if self.patience is not None:
            _at_least("patience", self.patience, 1)


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"config key '{key}': must be at least {low}, got {value}")


@dataclass
class TrainResult:
    """The outcome of a run; `best_state` (CPU tensors) holds the weights chosen on validation,
    `peak_memory` the peak of the busiest rank since this (possibly resumed) run started, as
    `Runtime.peak_memory` measures it."""

    best_val_score: float
    best_epoch: int
    steps: int
    epochs: int
    stopped_early: bool
    zero_val_score: float
    history: list[dict[str, Any]]
    best_state: dict[str, torch.Tensor]
    peak_memory: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Models: a plain-data spec that a checkpoint stores, so it rebuilds without the original files.

def model_spec(cfg: ModelConfig, refiner: bool = False) -> dict[str, Any]:
    """{name, kwargs, genotype, refiner}: the genotype inline as plain data, not as a path;
    `refiner`: the network is the full-resolution stage of a cascade (`nas_dose.cascade`), its
    input one channel wider (the coarse dose) and its output added to that channel."""
    kwargs, genotype = dict(cfg.kwargs), None
    if cfg.genotype is not None:
        from .search_spaces import load_genotype

        genotype = load_genotype(Path(cfg.genotype)).to_dict()
        if refiner:
            genotype["macro"] = {**genotype["macro"], "in_channels": REFINER_CHANNELS}
    elif refiner:
        kwargs["in_channels"] = REFINER_CHANNELS
    return {"name": cfg.name, "kwargs": kwargs, "genotype": genotype, "refiner": refiner}


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    if spec.get("genotype") is not None:
        from .search_spaces import genotype_from_dict
        from .search_spaces import build_model as build_genotype

        net = build_genotype(genotype_from_dict(spec["genotype"]))
    else:
        from .models import create_model

        net = create_model(spec["name"], **spec.get("kwargs", {}))
    return Refiner(net) if spec.get("refiner") else net


def build_model(cfg: ModelConfig, refiner: bool = False) -> nn.Module:
    """The network a ModelConfig describes, freshly initialized (seed first for repeatability)."""
    return model_from_spec(model_spec(cfg, refiner))


def load_model(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model (CPU, eval mode) from a run folder (its best.pt) or a checkpoint file.

    Returns the model and the checkpoint's metadata (config, epoch, score; no tensors).
    """
    path = Path(path)
    file = path / "best.pt" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise input_error(path, "not a training run folder (no best.pt)")
    ckpt = load_checkpoint(file)
    spec, weights = ckpt.get("model_config"), ckpt.get("model")
    if ckpt.get("format") != CHECKPOINT_FORMAT or not isinstance(spec, dict) or not isinstance(weights, dict):
        raise input_error(file, "not a nasdose model checkpoint")
    try:
        model = model_from_spec(spec)
    except NasDoseError as e:
        raise input_error(file, f"cannot rebuild its model ({e})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise input_error(file, f"weights do not fit the model they name ({first})") from None
    meta = {k: v for k, v in ckpt.items()
            if k in ("model_config", "config", "epoch", "step", "val_dose_score", "grid")}
    return model.eval(), meta


def check_trained_grid(file: Path, meta: dict[str, Any], grid: int | None) -> None:
    """A model predicts the grid it was trained on: a network trained at 16³ runs on 32³ data
    without a word, and predicts nonsense (checkpoints older than the grid record pass)."""
    trained = meta.get("grid")
    if grid is not None and trained is not None and trained != grid:
        raise input_error(file, f"the model was trained on the {trained}^3 grid, but the data is on the {grid}^3 "
                                f"grid (import the data with --grid {trained}, or train on this grid)")


# ---------------------------------------------------------------------------------------------
# Losses and the validation score.

def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                kind: Literal["l1", "mse"] = "l1", weight: torch.Tensor | None = None) -> torch.Tensor:
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


def validate(net: nn.Module, loader: Any, runtime: Runtime) -> tuple[float, float]:
    """Mean dose score (Gy) over the loader's patients, and that of the all-zero prediction.

    Sums stay on the device; the one host sync is at the end. In a distributed run every rank
    calls it, and the sums are all-reduced: the means are over the patients of all ranks (each
    once with a loader made with `shard="exact"`).
    """
    was_training = net.training
    net.eval()
    total = torch.zeros(3, device=runtime.device)  # dose errors, all-zero errors, patients
    with torch.no_grad():
        for batch in loader:
            batch = runtime.to_device(batch)
            with runtime.autocast():
                pred = net(batch["input"])
            target, mask = batch["target"], batch["mask"]
            total[0] += dose_errors_gy(pred, target, mask).sum()
            total[1] += dose_errors_gy(torch.zeros_like(target), target, mask).sum()
            total[2] += target.shape[0]
    net.train(was_training)
    distributed.all_reduce(total)
    score, zero = (total[:2] / total[2].clamp_min(1)).tolist()
    return score, zero


def share_weight(mask: torch.Tensor) -> torch.Tensor:
    """The factor of a rank's loss (a mean over its share of the batch's mask voxels) that makes
    the ranks' losses, averaged as DDP averages gradients, the mean over the whole batch's mask
    voxels: world size × the rank's fraction of those voxels. Collective."""
    voxels = mask.sum()
    return voxels * distributed.world_size() / distributed.all_reduce(voxels.detach().clone()).clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule.

def make_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning-rate multiplier before optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress_ = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))
    if cfg.name == "step":
        return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, total_steps, steps_per_epoch))


# ---------------------------------------------------------------------------------------------
# The objective: what a step minimizes.

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

    def train_set(self, data: Path, config: TrainConfig) -> DoseDataset | PatchDataset:
        with open_data(data) as d:
            held_out = config.data.held_out(d.ids(config.data.train_split))
        return DoseDataset(data, config.data.train_split, augment=config.data.augment, seed=config.seed,
                           exclude=held_out)

    def val_set(self, data: Path, config: TrainConfig) -> DoseDataset | PatchDataset:
        """What the checkpoint is chosen on (the validation patients, whole)."""
        return DoseDataset(data, config.data.val_split)

    def bind(self, model: nn.Module, runtime: Runtime, config: TrainConfig) -> None:
        """Called once the model is on the runtime's device, before its optimizer is made."""
        self.kind, self.dvh = config.loss, config.dvh_loss

    def parameters(self) -> list[nn.Parameter]:
        return []

    def loss(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """The loss to minimize, given the model's prediction for `batch` (on the device)."""
        loss = masked_loss(pred, batch["target"], batch["mask"], self.kind)
        if self.dvh.weight:
            loss = loss + self.dvh.weight * dvh_moment_loss(pred * batch["mask"], batch["target"],
                                                            batch["input"], self.dvh)
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (an empty dict from a checkpoint without one)."""

    def log_terms(self) -> dict[str, float]:
        return {}


class CascadeObjective(Objective):
    """The full-resolution stage of a cascade (`config.cascade`): source-grid patches with the
    coarse dose as an extra channel. The checkpoint is chosen on fixed patches of the validation
    patients whose coarse dose is the coarse model's own prediction, as at inference."""

    def __init__(self, config: TrainConfig, data: Path) -> None:
        self.cascade = config.cascade
        if self.cascade.coarse is None:
            raise ConfigError("config key 'cascade.coarse': the coarse stage to refine is needed")
        # Imported here: the coarse stage may be an ensemble, a stage built on this module.
        from .predict import load_predictor, predict_patients

        runtime = Runtime(config.runtime)
        predictor = load_predictor(Path(self.cascade.coarse), runtime)
        with open_data(data) as d:
            self.coarse_doses = dict(predict_patients(predictor, d, d.ids(config.data.val_split), runtime))
            if self.cascade.coarse_input == "predictions":
                self.coarse_doses.update(self._training_predictions(d, config.data.train_split))

    def _training_predictions(self, data: DataFile, split: str) -> dict[str, np.ndarray]:
        """The coarse doses of the training patients, from `cascade.coarse_predictions`."""
        path = Path(self.cascade.coarse_predictions or "")
        with open_data(path) as preds:
            if preds.kind != "predictions" or preds.grid != data.grid:
                raise input_error(path, f"not a prediction file on the data set's {data.grid}³ grid")
            missing = [pid for pid in data.ids(split) if pid not in preds]
            if missing:
                raise input_error(path, f"no coarse prediction for training patient(s) {', '.join(missing[:5])}")
            return {pid: preds.read_dose(pid) for pid in data.ids(split)}

    def train_set(self, data: Path, config: TrainConfig) -> PatchDataset:
        doses = self.coarse_doses if self.cascade.coarse_input == "predictions" else None
        return PatchDataset(data, config.data.train_split, self.cascade, augment=config.data.augment,
                            seed=config.seed, coarse_doses=doses)

    def val_set(self, data: Path, config: TrainConfig) -> PatchDataset:
        return PatchDataset(data, config.data.val_split, self.cascade, seed=config.seed,
                            coarse_doses=self.coarse_doses, fixed=True)


# ---------------------------------------------------------------------------------------------
# The training loop.

@dataclass
class _Progress:
    """What a checkpoint must restore besides the weights, optimizer, schedule and RNGs."""

    step: int = 0
    best_score: float = math.inf
    best_epoch: int = 0
    zero_score: float = math.nan
    stopped_early: bool = False
    seconds: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _batches(loader: Any, dataset: DoseDataset, start: int) -> Iterator[dict[str, Any]]:
    """Training batches from global batch index `start` on, pass after pass over the split.

    The loader draws pass p's order and augmentations from (seed, p) alone, so the stream is the
    same whether the run was interrupted or not; resuming mid-pass skips that pass's first
    batches (read, not trained on: cheaper than the steps a checkpoint interval can lose).
    """
    epoch_pass, offset = divmod(start, len(loader))
    while True:
        dataset.set_epoch(epoch_pass)
        yield from itertools.islice(loader, offset, None)
        epoch_pass, offset = epoch_pass + 1, 0


class _RunFolder:
    """The files of a run with an output folder: config, log, checkpoints, metrics."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.last = out / "checkpoints" / "last.pt"
        self.best = out / "best.pt"
        self.log = out / "log.jsonl"

    def check_new(self) -> None:
        if self.last.exists() or self.best.exists():
            raise input_error(self.out, "already holds a training run; use --resume to continue it "
                                        "or choose another --out")

    def rewrite_log(self, history: list[dict[str, Any]]) -> None:
        """The log as of the checkpoint (entries written after it are dropped on resume)."""
        with atomic_path(self.log) as tmp:
            tmp.write_text("".join(json.dumps(e) + "\n" for e in history))

    def append_log(self, entry: dict[str, Any]) -> None:
        """JSON lines are appended (one write per line); a resume rewrites the file whole."""
        if not distributed.writes_here():
            return
        with open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, file: Path) -> None:
    if ckpt.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ckpt:
        raise input_error(file, "not a nasdose training checkpoint")
    old = {k: v for k, v in ckpt["config"].items() if k != "runtime"}
    new = {k: v for k, v in to_dict(cfg).items() if k != "runtime"}
    if old != new:
        keys = sorted(_differences(old, new))
        raise input_error(file, f"the run was made with a different config ({', '.join(keys)}); "
                                "resume with the run's own config.yaml or choose another --out")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))]
    return [] if a == b else [prefix]


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def check_input_size(model: nn.Module, grid: int, channels: int = IN_CHANNELS) -> None:
    """Fail before anything is written when the network cannot take `grid`³ volumes (a U-Net
    too deep for the grid), not at the first step: one forward on the meta device."""
    meta_forward(meta_copy(model), (1, channels, grid, grid, grid))


class _Trainer:
    """One training run: set up (or restored from a checkpoint), then stepped to its end."""

    def __init__(self, model: nn.Module, config: TrainConfig, data: Path, out: Path | None,
                 resume: bool, on_step: Callable[[int], None] | None, objective: Objective | None = None) -> None:
        self.model, self.config, self.on_step = model, config, on_step
        self.objective = objective if objective is not None else Objective()
        self.runtime = rt = Runtime(config.runtime)
        rt.reset_peak_memory()
        seed_everything(config.seed)
        self.train_set = self.objective.train_set(data, config)
        if self.train_set.data.kind != "dataset":
            raise input_error(data, "is a prediction file, not a data set")
        check_input_size(model, self.train_set.grid, getattr(self.train_set, "in_channels", IN_CHANNELS))
        # Under torchrun each rank takes its share of every batch: data.batch_size is the global batch.
        workers = rt.loader_workers(config.data.num_workers)
        self.train_loader = make_loader(self.train_set, config.data.batch_size, shuffle=True,
                                        num_workers=workers, seed=config.seed,
                                        pin_memory=rt.pin_memory, shard="even")
        self.val_loader = make_loader(self.objective.val_set(data, config), config.data.batch_size,
                                      shuffle=False, num_workers=workers,
                                      pin_memory=rt.pin_memory, shard="exact")
        self.steps_per_epoch = config.steps_per_epoch or len(self.train_loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.net = rt.prepare(model)
        self.objective.bind(model, rt, config)
        self.trained = [*model.parameters(), *self.objective.parameters()]
        self.optimizer = make_optimizer(self.trained, config.optim)
        self.scheduler = make_scheduler(self.optimizer, config.schedule, self.total_steps, self.steps_per_epoch)
        self.scaler = rt.grad_scaler()
        self.state = _Progress()
        self.best_state: dict[str, torch.Tensor] = {}
        self.loss_sum = torch.zeros((), device=rt.device)  # summed on the device: no per-step sync
        self.clock = time.perf_counter()
        self.folder = _RunFolder(Path(out)) if out is not None else None
        if self.folder is not None:
            self.spec = model_spec(config.model, refiner=config.cascade.coarse is not None)
            self._open_folder(self.folder, resume)
        self.step_net = distributed.data_parallel(self.net, rt.device)  # what training steps call
        self.free_bytes = rt.free_memory()  # what the run has to work with, for an out-of-memory error

    def _open_folder(self, folder: _RunFolder, resume: bool) -> None:
        if resume and folder.last.exists():
            ckpt = load_checkpoint(folder.last)
            _check_resumable(ckpt, self.config, folder.last)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.objective.load_state_dict(ckpt.get("objective", {}))
            set_rng_state(ckpt["rng"])
            self.state = from_dict(_Progress, ckpt["progress"])
            self.best_state = ckpt["best_model"]
            say(f"resuming {folder.out} at step {self.state.step} of {self.total_steps}")
        elif not resume:
            folder.check_new()
        folder.rewrite_log(self.state.history)
        save_config(folder.out / "config.yaml", self.config)

    def run(self) -> TrainResult:
        try:
            self._loop()
        except torch.cuda.OutOfMemoryError:
            raise self._memory_error() from None
        self._sync()
        return self._finish()

    def _loop(self) -> None:
        state, spe = self.state, self.steps_per_epoch
        done = state.stopped_early or state.step >= self.total_steps
        bar = None
        self.net.train()
        for batch in iter(()) if done else _batches(self.train_loader, self.train_set, state.step):
            epoch = state.step // spe + 1
            if bar is None:
                bar = progress(total=spe, desc=f"epoch {epoch}/{self.config.epochs}")
                bar.update(state.step % spe)
            self._step(batch)
            bar.update()
            epoch_end = state.step % spe == 0
            if state.step % self.config.log_every == 0 or epoch_end:
                entry = self._log(epoch, self._validate(epoch) if epoch_end else None)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", refresh=False)
            if epoch_end:
                bar.close()
                bar = None
            if epoch_end or state.step % self.config.checkpoint_every == 0:
                self._checkpoint()
            if self.on_step is not None:
                self.on_step(state.step)
            if state.stopped_early or state.step >= self.total_steps:
                break
        if bar is not None:
            bar.close()

    def _memory_error(self) -> NasDoseError:
        """The one-line error for a run that ran out of device memory, with what to change."""
        rt, batch = self.runtime, self.config.data.batch_size
        cuda = rt.device.type == "cuda"
        free = "the memory" if self.free_bytes is None else f"the {self.free_bytes / 2**30:.1f} GiB"
        hints = [f"data.batch_size={batch // 2}"] if batch > 1 else []
        if cuda and rt.amp == "off":
            hints.append(f"runtime.amp={'bf16' if torch.cuda.is_bf16_supported() else 'fp16'}")
        hints.append("a smaller model")
        return NasDoseError(f"training does not fit in {'GPU ' if cuda else ''}memory: batch {batch} at grid "
                            f"{self.train_set.grid}³ needs more than {free} free on {rt.device} "
                            f"(try {', '.join(hints)})")

    def _forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of a (host) batch, its gradients left in the parameters (scaled for fp16)."""
        rt = self.runtime
        batch = rt.to_device(batch)
        with rt.autocast():
            pred = self.step_net(batch["input"])
        loss = self.objective.loss(pred, batch)
        if distributed.world_size() > 1:
            loss = loss * share_weight(batch["mask"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss

    def _step(self, batch: dict[str, Any]) -> None:
        cfg = self.config
        loss = self._forward_backward(batch)
        distributed.average_gradients(self.objective.parameters())  # DDP averages the model's
        if cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trained, cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.loss_sum += loss.detach()
        self.state.step += 1
        self.state.loss_count += 1

    def _sync(self) -> None:
        """Bring the device-side loss sum (averaged over the ranks, so that all hold the whole
        batches' losses) and the wall time into the (checkpointed) state. Collective."""
        self.state.loss_sum += distributed.all_reduce(self.loss_sum, "mean").item()
        self.loss_sum.zero_()
        now = time.perf_counter()
        self.state.seconds += now - self.clock
        self.clock = now

    def _validate(self, epoch: int) -> float | None:
        """At an epoch end: score, keep the best weights, decide on early stopping."""
        cfg, state = self.config, self.state
        if epoch % cfg.val_every and epoch != cfg.epochs:
            return None
        val, state.zero_score = validate(self.net, self.val_loader, self.runtime)
        if val < state.best_score:
            state.best_score, state.best_epoch = val, epoch
            self.best_state = _cpu_state(self.model)
            if self.folder is not None:
                save_checkpoint(self.folder.best, {
                    "format": CHECKPOINT_FORMAT, "model_config": self.spec, "config": to_dict(cfg),
                    "grid": self.train_set.data.grid, "model": self.best_state, "epoch": epoch, "step": state.step,
                    "val_dose_score": val})
        state.stopped_early = cfg.patience is not None and epoch - state.best_epoch >= cfg.patience
        return val

    def _log(self, epoch: int, val: float | None) -> dict[str, Any]:
        self._sync()
        state = self.state
        loss = state.loss_sum / state.loss_count if state.loss_count else None
        if loss is not None and not math.isfinite(loss):
            raise NasDoseError(f"training diverged: the loss is {loss} at step {state.step} "
                               "(try a lower optim.lr)")
        entry = {"step": state.step, "epoch": epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                 "val_dose_score": val, "seconds": round(state.seconds, 3), **self.objective.log_terms()}
        state.history.append(entry)
        if self.folder is not None:
            self.folder.append_log(entry)
        state.loss_sum, state.loss_count = 0.0, 0
        return entry

    def _checkpoint(self) -> None:
        if self.folder is None:
            return
        self._sync()
        if not distributed.writes_here():  # every rank holds the same state: rank 0 saves it
            return
        state, spe = self.state, self.steps_per_epoch
        save_checkpoint(self.folder.last, {
            "format": CHECKPOINT_FORMAT, "model_config": self.spec, "config": to_dict(self.config),
            "grid": self.train_set.data.grid, "step": state.step, "epoch": state.step // spe,
            "epoch_step": state.step % spe,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": rng_state(), "progress": to_dict(state), "best_model": self.best_state,
            "objective": self.objective.state_dict()})

    def _finish(self) -> TrainResult:
        state, rt = self.state, self.runtime
        epochs = math.ceil(state.step / self.steps_per_epoch)
        peak = rt.peak_memory()
        # The run's peak is that of its most loaded rank (collective: every rank finishes).
        peak["bytes"] = int(distributed.all_reduce(torch.tensor(peak["bytes"], device=rt.device), "max").item())
        if self.folder is not None:
            save_json(self.folder.out / "metrics.json", {
                "best_val_dose_score": state.best_score, "best_epoch": state.best_epoch,
                "zero_dose_val_score": state.zero_score, "steps": state.step, "epochs": epochs,
                "stopped_early": state.stopped_early,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "seconds": round(state.seconds, 3),
                "seconds_per_epoch": round(state.seconds * self.steps_per_epoch / max(state.step, 1), 3),
                "peak_memory": peak, "runtime": rt.describe()})
        return TrainResult(best_val_score=state.best_score, best_epoch=state.best_epoch, steps=state.step,
                           epochs=epochs, stopped_early=state.stopped_early, zero_val_score=state.zero_score,
                           history=state.history, best_state=self.best_state, peak_memory=peak)


def train_model(model: nn.Module, config: TrainConfig, data: Path, out: Path | None = None,
                resume: bool = False, *, on_step: Callable[[int], None] | None = None,
                objective: Objective | None = None) -> TrainResult:
    """Train `model` (built from `config.model`) on `data`; with `out`, write the run's files.

    Seeds the global RNGs with `config.seed`. With `out=None` nothing is written (short runs
    inside the search). `resume` continues the run in `out` from its last checkpoint, bit for
    bit where the hardware allows it (it starts afresh when there is none). `on_step` is called
    with the global step count after each optimizer step (and after its checkpoint).
    `objective` replaces the masked loss to the target (see `Objective`); the model is still
    chosen on the validation dose score against the reference dose.
    On return `model` holds the last weights; `best_state` the ones chosen on validation.
    """
    if objective is None and config.cascade.coarse is not None:
        objective = CascadeObjective(config, Path(data))
    return _Trainer(model, config, Path(data), out, resume, on_step, objective).run()


# ---------------------------------------------------------------------------------------------
# Command line.

def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="nasdose data set")
    parser.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in RUN from its last checkpoint")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> None:
    config = load_config(TrainConfig, args.config, args.overrides)
    seed_everything(config.seed)
    cascade = config.cascade.coarse is not None
    model = build_model(config.model, refiner=cascade)
    with output_folder(args.out):
        result = train_model(model, config, args.data, args.out, resume=args.resume)
        with open_data(args.data) as data:
            grid = "patches" if cascade else f"{data.grid}³ grid"
        say(f"best validation dose score {result.best_val_score:.3f} Gy on the {grid} at epoch {result.best_epoch} "
            f"(all-zero prediction: {result.zero_val_score:.3f} Gy); model: {Path(args.out) / 'best.pt'}")
        if distributed.writes_here():
            _report_official(args.out, Path(args.data), config)


def _report_official(run: Path, data: Path, config: TrainConfig) -> None:
    """Where the data set was resampled (or the run refines a coarse stage), the checkpoint was
    chosen on a proxy: score it as OpenKBP does, on the source grid, into metrics.json."""
    # Imported here: prediction loads ensembles, a stage built on this module.
    from .predict import load_predictor, official_scores

    with open_data(data) as d:
        ids = d.ids(config.data.val_split)
        if config.cascade.coarse is None and all(d.source_grid(pid) == d.grid for pid in ids):
            return
        runtime = Runtime(config.runtime)
        scores = official_scores(load_predictor(Path(run), runtime), d, ids, runtime)
    metrics = load_json(Path(run) / "metrics.json")
    save_json(Path(run) / "metrics.json", {**metrics, "official_val_scores": {
        "dose_score": scores.dose_score, "dvh_score": scores.dvh_score, "patients": len(ids),
        "grid": d.source_grid(ids[0])}})
    say(f"official validation scores (OpenKBP, {d.source_grid(ids[0])}³ source grid, {len(ids)} patients): "
        f"dose {scores.dose_score:.3f} Gy, DVH {scores.dvh_score:.3f} Gy")
