"""The training loop: one run set up (or restored from its checkpoint exactly), stepped to its end,
validated, checkpointed; data-parallel under torchrun (docs/how-to/distributed.md)."""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..config import ConfigError, from_dict, save_config, to_dict
from ..data.dataset import (
    IN_CHANNELS,
    PREFETCH,
    EpochDataset,
    item_bytes,
    make_loader,
    shared_memory_free,
    workers_within_shared_memory,
)
from ..errors import NasDoseError, input_error
from ..io import load_checkpoint, save_checkpoint, save_json
from ..models.factory import CHECKPOINT_FORMAT, check_input_size, model_spec
from ..progress import Bar, progress, say
from ..runtime import Runtime, rng_state, seed_everything, set_rng_state
from .checkpoints import RunFolder, check_resumable
from .config import TrainConfig
from .events import EventLog
from .losses import dose_errors_gy, share_weight
from .objective import Objective
from .optimization import make_optimizer, make_scheduler


def forward(net: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The network's prediction for a batch: a conditioned network's asked for the batch's preferences."""
    return net(batch["input"], batch["preferences"]) if "preferences" in batch else net(batch["input"])


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
                pred = forward(net, batch)
            target, mask = batch["target"], batch["mask"]
            total[0] += dose_errors_gy(pred, target, mask).sum()
            total[1] += dose_errors_gy(torch.zeros_like(target), target, mask).sum()
            total[2] += target.shape[0]
    net.train(was_training)
    distributed.all_reduce(total)
    score, zero = (total[:2] / total[2].clamp_min(1)).tolist()
    return score, zero


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


def _batches(loader: Any, dataset: EpochDataset, start: int) -> Iterator[dict[str, Any]]:
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


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _epoch_line(entry: dict[str, Any], epochs: int, best: float, eta_s: float) -> str:
    """One line per epoch: what a user watching a run wants to see."""
    val = entry["val_dose_score"]
    return (f"epoch {entry['epoch']}/{epochs}: loss {entry['loss']:.4f}, lr {entry['lr']:.2e}"
            + (f", validation dose score {val:.3f} Gy (best {best:.3f})" if val is not None else "")
            + f", {entry['seconds']:.0f} s, ETA {eta_s:.0f} s"
            # the steps' wait for batches, when it is worth a look (more data.num_workers on a GPU)
            + (f" ({entry['data_wait_s']:.0f} s of the epoch waiting for data)"
               if entry.get("data_wait_s", 0.0) >= 1.0 else ""))


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
        workers = self._workers(rt.loader_workers(config.data.num_workers), config.data.batch_size)
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
        self.data_wait = 0.0  # seconds the steps waited for the loader since the last epoch end
        self.folder = RunFolder(Path(out)) if out is not None else None
        if self.folder is not None:
            # a cascade stage's patches and a dose prior's items have no extra input channels
            self.spec = model_spec(config.model, refiner=config.cascade.coarse is not None,
                                   extra=getattr(self.train_set, "extra_inputs", ()))
            self._open_folder(self.folder, resume)
        self.events = EventLog.open(Path(out) if out is not None else None, config.logging,
                                    purge_step=self.state.step + 1 if self.state.step else None)
        self.step_net = distributed.data_parallel(self.net, rt.device)  # what training steps call
        self.free_bytes = rt.free_memory()  # what the run has to work with, for an out-of-memory error

    def _workers(self, workers: int, batch_size: int) -> int:
        """`workers`, or fewer where their batches would not fit in shared memory (said in a line)."""
        free = shared_memory_free()
        if not workers or free is None:
            return workers
        processes = distributed.local_world_size()  # the node's other processes of the run load too
        free //= processes
        size = item_bytes(self.train_set)
        fits = workers_within_shared_memory(workers, size, batch_size, free)
        if fits < workers:
            share = f" for each of the node's {processes} processes" if processes > 1 else ""
            say(f"data.num_workers: {fits} instead of {workers}: /dev/shm has {free / 2**20:.0f} MiB free{share} and "
                f"each worker holds {PREFETCH * batch_size * size / 2**20:.1f} MiB of batches there "
                "(in a container, give it more: docker run --shm-size=…)")
        return fits

    def _open_folder(self, folder: RunFolder, resume: bool) -> None:
        if resume and folder.last.exists():
            ckpt = load_checkpoint(folder.last)
            check_resumable(ckpt, self.config, folder.last)
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
        finally:
            self.events.close()
        self._sync()
        return self._finish()

    def _loop(self) -> None:
        state, spe = self.state, self.steps_per_epoch
        done = state.stopped_early or state.step >= self.total_steps
        bar: Bar | None = None
        self.net.train()
        asked = time.perf_counter()
        for batch in iter(()) if done else _batches(self.train_loader, self.train_set, state.step):
            self.data_wait += time.perf_counter() - asked
            epoch = state.step // spe + 1
            if bar is None:
                bar = progress(total=spe, desc=f"epoch {epoch}/{self.config.epochs}")
                bar.update(state.step % spe)
            self._step(batch)
            bar.update()
            epoch_end = state.step % spe == 0
            if state.step % self.config.log_every == 0 or epoch_end:
                entry = self._log(epoch, *(self._validate(epoch) if epoch_end else (None, None)))
                bar.set_postfix(loss=f"{entry['loss']:.4f}", refresh=False)
            if epoch_end:
                bar.close()
                bar = None
                if distributed.writes_here():
                    eta = state.seconds / max(state.step, 1) * (self.total_steps - state.step)
                    say(_epoch_line(entry, self.config.epochs, state.best_score, eta))
            if epoch_end or state.step % self.config.checkpoint_every == 0:
                self._checkpoint()
            if self.on_step is not None:
                self.on_step(state.step)
            if state.stopped_early or state.step >= self.total_steps:
                break
            asked = time.perf_counter()
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
            pred = forward(self.step_net, batch)
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

    def _validate(self, epoch: int) -> tuple[float | None, float | None]:
        """At an epoch end: score, keep the best weights, decide on early stopping. Returns the
        score and the seconds it took, so the log separates validation from training time."""
        cfg, state = self.config, self.state
        if epoch % cfg.val_every and epoch != cfg.epochs:
            return None, None
        start = time.perf_counter()
        val, state.zero_score = validate(self.net, self.val_loader, self.runtime)
        seconds = time.perf_counter() - start
        if val < state.best_score:
            state.best_score, state.best_epoch = val, epoch
            self.best_state = _cpu_state(self.model)
            if self.folder is not None:
                save_checkpoint(self.folder.best, {
                    "format": CHECKPOINT_FORMAT, "model_config": self.spec, "config": to_dict(cfg),
                    "grid": self.train_set.data.grid, "model": self.best_state, "epoch": epoch, "step": state.step,
                    "val_dose_score": val})
        state.stopped_early = cfg.patience is not None and epoch - state.best_epoch >= cfg.patience
        return val, seconds

    def _log(self, epoch: int, val: float | None, val_seconds: float | None = None) -> dict[str, Any]:
        self._sync()
        state = self.state
        loss = state.loss_sum / state.loss_count if state.loss_count else None
        if loss is not None and not math.isfinite(loss):
            raise NasDoseError(f"training diverged: the loss is {loss} at step {state.step} "
                               "(try a lower optim.lr)")
        terms, lr = self.objective.log_terms(), float(self.scheduler.get_last_lr()[0])
        entry = {"step": state.step, "epoch": epoch, "loss": loss, "lr": lr,
                 "val_dose_score": val, "seconds": round(state.seconds, 3), **terms}
        if val_seconds is not None:
            # Where an epoch's time went besides the steps: a loader that cannot keep up shows here.
            entry.update(val_seconds=round(val_seconds, 3), data_wait_s=round(self.data_wait, 3))
            self.data_wait = 0.0
        state.history.append(entry)
        if self.folder is not None:
            self.folder.append_log(entry)
        self.events.scalars(state.step, {"train/loss": loss, "train/lr": lr, "val/dose_score": val,
                                         "val/best_dose_score": state.best_score if val is not None else None,
                                         **{f"train/{k}": v for k, v in terms.items()}})
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
        raise ConfigError("config key 'cascade.coarse': a cascade's stage trains with its own objective "
                          "(nas_dose.cascade.objective.CascadeObjective)")
    return _Trainer(model, config, Path(data), out, resume, on_step, objective).run()
