"""Model construction in one place: a registered model by name, a searched genotype, or the
full-resolution stage of a cascade around either, each optionally conditioned on planning
preferences, from a config or from the plain-data spec that a checkpoint stores (so a trained
model rebuilds without the files it was made from)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from nas_dose.search_spaces import Genotype, genotype_from_dict, load_genotype
from nas_dose.search_spaces import build_model as build_genotype
from nas_dose.search_spaces.measure import meta_copy, meta_forward

from ..config import ConfigError
from ..data.dataset import IN_CHANNELS
from ..data.preferences import NAMES
from ..errors import NasDoseError, input_error
from ..io import load_checkpoint
from .conditioning import KINDS, condition, conditioning_spec, preference_shapes
from .refiner import REFINER_CHANNELS, Refiner
from .registry import create_model, model_takes

CHECKPOINT_FORMAT = "nasdose-checkpoint"


@dataclass
class ModelConfig:
    """A registered model (`name` with `kwargs`) or, when `genotype` is a file, a searched network;
    `conditioning: film` conditions it on the planning preferences (`nas_dose.models.conditioning`)."""

    name: str = "unet3d"
    kwargs: dict[str, Any] = field(default_factory=dict)
    genotype: str | None = None
    conditioning: str | None = None

    def validate(self) -> None:
        if self.genotype is not None and self.kwargs:
            raise ConfigError("config key 'model.kwargs': a genotype model takes no kwargs")
        if self.conditioning is not None and self.conditioning not in KINDS:
            raise ConfigError(f"config key 'model.conditioning': expected one of {', '.join(KINDS)} (or none), "
                              f"got {self.conditioning!r}")


def model_spec(cfg: ModelConfig, refiner: bool = False, extra: Sequence[str] = ()) -> dict[str, Any]:
    """{name, kwargs, genotype, refiner} and, for a conditioned model only, `conditioning`: the
    genotype inline as plain data, not as a path; `refiner`: the network is the full-resolution
    stage of a cascade (`nas_dose.cascade`), its input one channel wider (the coarse dose) and its
    output added to that channel. `extra`: the data set's extra input channels (`extra_inputs`),
    recorded as `inputs`; a registered model is fitted to them, a genotype must have been searched
    for as many."""
    kwargs, genotype = dict(cfg.kwargs), None
    in_channels = IN_CHANNELS + len(extra)
    if refiner and extra:
        raise ConfigError(f"a cascade's full-resolution stage takes the {IN_CHANNELS} standard input channels, "
                          f"not a data set's extra ones ({in_channels} here)")
    if cfg.genotype is not None:
        loaded = load_genotype(Path(cfg.genotype))
        searched_for = loaded.macro.get("in_channels", IN_CHANNELS)
        if not refiner and searched_for != in_channels:
            # on standard data one channel more can only be a cascade stage's coarse dose
            if searched_for == REFINER_CHANNELS and in_channels == IN_CHANNELS:
                raise input_error(Path(cfg.genotype), "a genotype searched for a cascade's full-resolution stage "
                                                      "(cascade.coarse): train it with cascade.coarse=RUN")
            raise input_error(Path(cfg.genotype), f"searched for {searched_for} input channels, but the data set "
                                                  f"gives {in_channels}")
        genotype = spec_genotype(loaded, refiner)
    elif refiner:
        kwargs["in_channels"] = REFINER_CHANNELS
    elif model_takes(cfg.name) == "dose":  # a dose prior's autoencoder reads a dose, not the patient
        pass
    elif kwargs.get("in_channels", in_channels) != in_channels:
        raise ConfigError(f"config key 'model.kwargs.in_channels': {kwargs['in_channels']}, but the data set gives "
                          f"{in_channels} input channels (leave it out)")
    elif in_channels != IN_CHANNELS:
        kwargs["in_channels"] = in_channels
    spec: dict[str, Any] = {"name": cfg.name, "kwargs": kwargs, "genotype": genotype, "refiner": refiner}
    if extra and (genotype is not None or model_takes(cfg.name) != "dose"):
        spec["inputs"] = list(extra)
    if cfg.conditioning is not None:
        if refiner:
            raise ConfigError("config key 'model.conditioning': a cascade's full-resolution stage cannot be "
                              "conditioned (condition its coarse stage)")
        spec["conditioning"] = conditioning_spec(cfg.conditioning, NAMES)
    return spec


def spec_genotype(genotype: Genotype, refiner: bool) -> dict[str, Any]:
    """The genotype as a checkpoint's spec holds it: a refiner's takes the coarse dose as one more
    input channel."""
    data = genotype.to_dict()
    if refiner:
        data["macro"] = {**data["macro"], "in_channels": REFINER_CHANNELS}
    return data


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    if spec.get("genotype") is not None:
        net = build_genotype(genotype_from_dict(spec["genotype"]))
    else:
        net = create_model(spec["name"], **spec.get("kwargs", {}))
    net = Refiner(net) if spec.get("refiner") else net
    return condition(net, spec["conditioning"]) if spec.get("conditioning") else net


def build_model(cfg: ModelConfig, refiner: bool = False, extra: Sequence[str] = ()) -> nn.Module:
    """The network a ModelConfig describes for data with the `extra` input channels, freshly
    initialized (seed first for repeatability)."""
    return model_from_spec(model_spec(cfg, refiner, extra))


def spec_inputs(spec: dict[str, Any]) -> tuple[str, ...]:
    """The extra input channels, by name, that the model of a checkpoint's spec takes."""
    return tuple(spec.get("inputs", ()))


def data_channels(spec: dict[str, Any]) -> int:
    """How many input channels of a data set the model of a checkpoint's spec takes (a cascade
    stage's coarse-dose channel is not the data's)."""
    if spec.get("genotype") is not None:
        channels = int(spec["genotype"]["macro"].get("in_channels", IN_CHANNELS))
    else:
        channels = int(spec.get("kwargs", {}).get("in_channels", IN_CHANNELS))
    return channels - 1 if spec.get("refiner") else channels


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
    if spec.get("genotype") is None and model_takes(str(spec.get("name"))) == "dose":
        raise input_error(file, "is a dose prior's autoencoder (stage I of a training run, RUN/prior), which "
                                "reconstructs doses; predict with the run itself")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise input_error(file, f"weights do not fit the model they name ({first})") from None
    meta = {k: v for k, v in ckpt.items()
            if k in ("model_config", "config", "epoch", "step", "val_dose_score", "grid")}
    return model.eval(), meta


def check_trained_on(file: Path, meta: dict[str, Any], grid: int | None, extra: Sequence[str] | None = None) -> None:
    """A model predicts the grid it was trained on: a network trained at 16³ runs on 32³ data
    without a word, and predicts nonsense (checkpoints older than the grid record pass). With
    `extra`, the data set's extra input channels must be the ones the model takes."""
    trained = meta.get("grid")
    if grid is not None and trained is not None and trained != grid:
        raise input_error(file, f"the model was trained on the {trained}^3 grid, but the data is on the {grid}^3 "
                                f"grid (import the data with --grid {trained}, or train on this grid)")
    takes = spec_inputs(meta["model_config"])
    if extra is not None and takes != tuple(extra):
        raise input_error(file, f"the model takes the extra input channels [{', '.join(takes)}], but the data set "
                                f"has [{', '.join(extra)}] (predict data made like its training data)")


def check_input_size(model: nn.Module, grid: int, channels: int = IN_CHANNELS) -> None:
    """Fail before anything is written when the network cannot take `grid`³ volumes (a U-Net
    too deep for the grid), not at the first step: one forward on the meta device."""
    meta_forward(meta_copy(model), (1, channels, grid, grid, grid), *preference_shapes(model))
