"""Preference conditioning for any network: FiLM on the outputs of its normalization layers.

`Conditioned(net, names, ranges)` embeds the preference vector with a small MLP and replaces each
normalization layer of `net` (batch, instance or group norm) by `FiLMNorm`: the same layer, its
output scaled by 1 + gamma and shifted by beta per channel, gamma and beta a linear function of
the embedding (after an instance norm this is AdaIN). The network's own code is untouched, so a
reference U-Net, a network built from a genotype and a cascade's refiner are conditioned alike,
and the heads start at zero: a fresh conditioned network computes what the plain one would.

The embedding reaches the layers through a context the wrapper fills for the duration of one
forward pass, so the wrapped network keeps its one-tensor `forward(x)`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ..data.preferences import PREFERENCES
from ..errors import NasDoseError

KINDS = ("film",)
HIDDEN = 32  # width of the preference embedding


class _Context:
    """The preference embedding of the forward pass in progress (None outside one)."""

    embedding: torch.Tensor | None = None


class FiLMNorm(nn.Module):
    """A normalization layer whose output is modulated per channel by the preference embedding."""

    def __init__(self, norm: nn.Module, channels: int, hidden: int, context: _Context) -> None:
        super().__init__()
        self.norm = norm
        self.film = nn.Linear(hidden, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        embedding = self.context.embedding
        if embedding is None:
            raise RuntimeError("a FiLM layer ran outside its Conditioned network's forward")
        gamma, beta = self.film(embedding).to(y.dtype).chunk(2, dim=1)
        shape = (*gamma.shape, *(1,) * (y.dim() - 2))
        return y * (1 + gamma.reshape(shape)) + beta.reshape(shape)


def _channels(module: nn.Module) -> int | None:
    """The channel count of a normalization layer FiLM can follow (None for other modules)."""
    if isinstance(module, _NormBase):
        return int(module.num_features)
    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    return None


class Conditioned(nn.Module):
    """`net` conditioned on preferences: `forward(x, preferences)`, preferences (N, P) in their
    own units (`nas_dose.data.preferences`), scaled to [0, 1] by `ranges` before the embedding."""

    low: torch.Tensor
    span: torch.Tensor

    def __init__(self, net: nn.Module, names: Sequence[str], ranges: Sequence[Sequence[float]],
                 hidden: int = HIDDEN) -> None:
        super().__init__()
        if not names or len(names) != len(ranges) or any(len(r) != 2 or not r[1] > r[0] for r in ranges):
            raise NasDoseError(f"conditioning: names {list(names)} need one (low, high) range each, got {ranges}")
        self.names = tuple(names)
        self.register_buffer("low", torch.tensor([r[0] for r in ranges], dtype=torch.float32), persistent=False)
        self.register_buffer("span", torch.tensor([r[1] - r[0] for r in ranges], dtype=torch.float32),
                             persistent=False)
        self.context = _Context()
        self.embed = nn.Sequential(nn.Linear(len(names), hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        targets = [(name, channels) for name, m in net.named_modules() if (channels := _channels(m)) is not None]
        if not targets:
            raise NasDoseError("conditioning: the network has no normalization layer to modulate")
        for name, channels in targets:
            parent, _, child = name.rpartition(".")
            owner = net.get_submodule(parent) if parent else net
            setattr(owner, child, FiLMNorm(owner.get_submodule(child), channels, hidden, self.context))
        self.net = net

    def forward(self, x: torch.Tensor, preferences: torch.Tensor) -> torch.Tensor:
        if preferences.dim() != 2 or preferences.shape != (x.shape[0], len(self.names)):
            raise NasDoseError(f"conditioning: expected preferences of shape ({x.shape[0]}, {len(self.names)}) "
                               f"({', '.join(self.names)}), got {tuple(preferences.shape)}")
        scaled = (preferences.to(self.low.dtype) - self.low) / self.span
        self.context.embedding = self.embed(scaled)
        try:
            return self.net(x)
        finally:
            self.context.embedding = None

    def at(self, values: Sequence[float]) -> Preset:
        """This network as a one-input predictor, asked for the preferences `values` (`names` order)."""
        if len(values) != len(self.names):
            raise NasDoseError(f"conditioning: {len(values)} preference values for {', '.join(self.names)}")
        return Preset(self, values)


class Preset(nn.Module):
    """A conditioned network (or anything taking `(x, preferences)`: an ensemble of them) with its
    preferences fixed: `forward(x)`, as every predictor."""

    values: torch.Tensor

    def __init__(self, model: nn.Module, values: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("values", torch.tensor([list(values)], dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.values.expand(x.shape[0], -1))


def plain_names(module: nn.Module) -> dict[str, str]:
    """Each state entry of `module` (or a part of a conditioned network) but its FiLM heads, mapped
    to the name it has in the same network unconditioned (a FiLMNorm's `norm.` dropped): how plain
    weights are loaded into a conditioned network."""
    wrapped = [f"{name}." for name, m in module.named_modules() if name and isinstance(m, FiLMNorm)]
    names = {}
    for key in module.state_dict():
        owner = next((w for w in wrapped if key.startswith(w)), None)
        if owner is None:
            names[key] = key
        elif not key.startswith(f"{owner}film."):
            names[key] = owner + key.removeprefix(f"{owner}norm.")
    return names


def preference_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """The shapes of the inputs a network takes beside the patient's (batch 1): a conditioned
    network's preferences, none for a plain one."""
    return [(1, len(model.names))] if isinstance(model, Conditioned) else []


def any_setting(model: nn.Module) -> nn.Module:
    """`model` as a one-input network for measuring what it costs: a conditioned one asked for the
    middle of its ranges (every setting costs the same), any other as it is."""
    if isinstance(model, Conditioned):
        return model.at((model.low + model.span / 2).tolist())
    return model


def conditioning_spec(kind: str, names: Sequence[str]) -> dict[str, Any]:
    """What a checkpoint's model spec holds of the conditioning: kind, names, their ranges, width."""
    if kind not in KINDS:
        raise NasDoseError(f"conditioning: expected one of {', '.join(KINDS)}, got {kind!r}")
    unknown = [n for n in names if n not in PREFERENCES]
    if unknown or not names:
        raise NasDoseError(f"conditioning: unknown preference {unknown[0] if unknown else None!r} "
                           f"(known: {', '.join(PREFERENCES)})")
    return {"kind": kind, "names": list(names), "ranges": [list(PREFERENCES[n][:2]) for n in names],
            "hidden": HIDDEN}


def condition(net: nn.Module, spec: dict[str, Any]) -> Conditioned:
    """`net` conditioned as a spec from `conditioning_spec` says."""
    return Conditioned(net, spec["names"], spec["ranges"], int(spec.get("hidden", HIDDEN)))
