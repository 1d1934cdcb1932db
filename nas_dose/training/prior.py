"""A dose prior, as the Flexible Dose Proposer trains one: stage I teaches a dose autoencoder to
reconstruct the training doses, stage II starts the dose model's decoder from the autoencoder's.

A decoder that has learned what doses look like (smooth fall-off, targets covered, no stray hot
spots) should need to learn less from the few patients stage II has, and leave fewer artifacts.
Only a model whose decoder reads nothing but a latent grid can reuse it (`latent_dose_net`; a
U-Net's decoder also reads the encoder's skips): the registry names each such model's
autoencoder (`prior_of`). Stage I is an ordinary training run of the autoencoder in RUN/prior/,
its items' input their own dose, so it checkpoints, resumes and logs like any run; stage II
optionally keeps the latent close to the autoencoder's encoding of the target dose
(`prior.latent_weight`), FDP's latent L1 term.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..data.dataset import EpochDataset, TrainingSet
from ..data.store import DataFile
from ..models.conditioning import Conditioned, plain_names
from ..models.factory import ModelConfig, build_model
from ..models.registry import prior_of
from ..progress import say
from ..runtime import Runtime, seed_everything
from .config import PriorConfig, TrainConfig
from .engine import train_model
from .losses import ConsistencyConfig, DVHLossConfig
from .objective import Objective


def prior_config(config: TrainConfig) -> TrainConfig:
    """Stage I's training: the model's autoencoder (same arguments but `in_channels`), for
    `prior.epochs`, on the run's data, optimizer, schedule and seed; no terms that read the
    patient's input (they have none)."""
    model = config.model
    name = prior_of(model.name) if model.genotype is None else None
    if name is None:
        raise ConfigError(f"config key 'prior.epochs': model '{model.genotype or model.name}' has no dose prior "
                          "(its decoder must read only a latent; latent_dose_net has one)")
    kwargs = {k: v for k, v in model.kwargs.items() if k != "in_channels"}
    return replace(config, model=ModelConfig(name=name, kwargs=kwargs), epochs=config.prior.epochs,
                   dvh_loss=DVHLossConfig(), consistency=ConsistencyConfig(), prior=PriorConfig())


class DoseAsInput:
    """A data set whose items' input is their own (masked, augmented) dose."""

    in_channels = 1

    def __init__(self, items: Any) -> None:
        self.items = items
        self.data: DataFile = items.data

    @property
    def grid(self) -> int:
        return int(self.items.grid)

    @property
    def epoch(self) -> int:
        return int(self.items.epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.items.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.items.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        item = self.items[key]
        return {**item, "input": item["target"]}


class Reconstruction(Objective):
    """Stage I: the masked loss of the reconstructed dose to the dose."""

    def train_set(self, data: Path, config: TrainConfig) -> TrainingSet:
        return DoseAsInput(super().train_set(data, config))

    def val_set(self, data: Path, config: TrainConfig) -> EpochDataset:
        return DoseAsInput(super().val_set(data, config))


def _part(model: nn.Module, name: str) -> nn.Module:
    """The model's `name` submodule (encoder, decoder), inside a conditioned model's network too."""
    return (model.net if isinstance(model, Conditioned) else model).get_submodule(name)


def load_decoder(model: nn.Module, autoencoder: dict[str, torch.Tensor], freeze: bool) -> None:
    """Copy the autoencoder's decoder weights into the model's decoder (through the FiLM layers of
    a conditioned model, whose heads stay as they are); `freeze`: stop them from training."""
    decoder = _part(model, "decoder")
    source = {k.removeprefix("decoder."): v for k, v in autoencoder.items() if k.startswith("decoder.")}
    names, own = plain_names(decoder), decoder.state_dict()
    if {plain: own[key].shape for key, plain in names.items()} != {k: v.shape for k, v in source.items()}:
        raise ConfigError("config key 'prior.epochs': the autoencoder's decoder does not fit the model's")
    decoder.load_state_dict({key: source[plain] for key, plain in names.items()}, strict=False)
    if freeze:
        for key, p in decoder.named_parameters():
            p.requires_grad_(key not in names)


class LatentTerm(Objective):
    """Stage II with FDP's latent term: + `weight` · L1(model's latent, autoencoder's latent of
    the target dose), the autoencoder's encoder fixed."""

    def __init__(self, encoder: nn.Module, weight: float) -> None:
        self.encoder, self.weight = encoder.eval().requires_grad_(False), weight
        self.latent: torch.Tensor | None = None
        self.total, self.count = torch.zeros(()), 0  # summed on the device: no per-step sync

    def bind(self, model: nn.Module, runtime: Runtime, config: TrainConfig) -> None:
        super().bind(model, runtime, config)
        self.encoder.to(runtime.device)
        self.total = self.total.to(runtime.device)
        _part(model, "encoder").register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.latent = output

    def loss(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        assert self.latent is not None, "the model's encoder did not run"
        with torch.no_grad():
            wanted = self.encoder(_padded(batch["target"], self.latent))
        term = (self.latent - wanted.to(self.latent.dtype)).abs().mean()
        self.latent = None
        self.total, self.count = self.total + term.detach().float(), self.count + 1
        return super().loss(pred, batch) + self.weight * term

    def log_terms(self) -> dict[str, float]:
        mean = float(self.total) / self.count if self.count else None
        self.total, self.count = torch.zeros_like(self.total), 0
        return {"latent": mean} if mean is not None else {}


def _padded(dose: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The dose zero-padded at the far end as the model pads its input: to the latent's size
    times the downsampling factor."""
    pads: list[int] = []
    for size, small in zip(reversed(dose.shape[2:]), reversed(latent.shape[2:])):
        pads += [0, small * -(-size // small) - size]
    return nn.functional.pad(dose, pads) if any(pads) else dose


def stage_two(model: nn.Module, config: TrainConfig, data: Path, out: Path, resume: bool) -> Objective | None:
    """Run (or, with `resume`, finish or reuse) stage I into `out`, load its decoder into `model`,
    and return stage II's objective (None: the plain one)."""
    stage_one = prior_config(config)
    seed_everything(stage_one.seed)
    autoencoder = build_model(stage_one.model)
    say(f"dose prior (stage I): {stage_one.model.name}, {stage_one.epochs} epochs, into {out}")
    result = train_model(autoencoder, stage_one, data, out, resume=resume, objective=Reconstruction())
    say(f"dose prior: reconstruction dose score {result.best_val_score:.3f} Gy on validation (epoch "
        f"{result.best_epoch}); the model's decoder starts from it")
    load_decoder(model, result.best_state, config.prior.freeze)
    if not config.prior.latent_weight:
        return None
    autoencoder.load_state_dict(result.best_state)
    return LatentTerm(autoencoder.get_submodule("encoder"), config.prior.latent_weight)
