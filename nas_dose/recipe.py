"""The pipeline's recipe: which stages run, on what data, with each stage's config.

The default recipe, configs/pipeline.yaml (a package file), holds every default the pipeline
has; a recipe a user gives is laid over it, and the quick one (configs/pipeline_quick.yaml)
over both for a smoke run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SHIPPED, ConfigError, load_config, to_dict
from .io import load_yaml

DEFAULT_RECIPE, QUICK_RECIPE = SHIPPED / "pipeline.yaml", SHIPPED / "pipeline_quick.yaml"
STAGE_NAMES = ("train", "folds", "search", "ensemble", "distill", "cascade")
# What each stage reads from an earlier one.
NEEDS = {"folds": "train", "ensemble": "search", "distill": "ensemble"}
COARSE_STAGE = {"unet3d": "train", "ensemble": "ensemble", "student": "distill"}


@dataclass
class SynthData:
    """The phantoms made when no --data is given (`nasdose data synth`), and their budget."""

    patients: int
    unlabeled: int
    grid: int
    epochs: int


@dataclass
class RealData:
    """With --data: the grid an OpenKBP tree is imported at, and the budget."""

    grid: int
    epochs: int


@dataclass
class Recipe:
    """What the pipeline runs: the stages in order; the grid and budget (`epochs`: of each ensemble
    member, the student and its baseline, the reference U-Net half as many; None: as the stage
    sections say), which win over the `synthetic` or `real` data defaults; each stage's config (a
    TrainConfig for `train`, `folds` and `cascade`, a SearchConfig, EnsembleConfig, DistillConfig,
    and the Configs of predict and evaluate, which score every model on validation). `cascade`
    trains the full-resolution stage (nas_dose.cascade) refining the model named by `coarse`;
    after `folds` it learns from out-of-fold coarse predictions of the training patients (the
    `train` stage's config trained `folds` times, each without one fold)."""

    stages: list[str]
    synthetic: SynthData
    real: RealData
    grid: int | None = None
    epochs: int | None = None
    seed: int = 0
    quick: bool = False  # set by the quick recipe: one training at a time, fewer plots
    coarse: str = "unet3d"
    folds: int = 2
    train: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    ensemble: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    cascade: dict[str, Any] = field(default_factory=dict)
    predict: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for i, name in enumerate(self.stages):
            if name not in STAGE_NAMES or name in self.stages[:i]:
                raise ConfigError(f"config key 'stages': {name!r} is not one of {', '.join(STAGE_NAMES)} "
                                  "or comes twice")
            needed = COARSE_STAGE.get(self.coarse, "?") if name == "cascade" else NEEDS.get(name)
            if needed is not None and needed not in self.stages[:i]:
                raise ConfigError(f"config key 'stages': {name!r} needs the {needed!r} stage before it"
                                  + (f" (it refines coarse: {self.coarse})" if name == "cascade" else ""))
        if self.folds < 2:
            raise ConfigError(f"config key 'folds': at least 2, got {self.folds}")
        if self.coarse not in COARSE_STAGE:
            raise ConfigError(f"config key 'coarse': one of {', '.join(COARSE_STAGE)}, got {self.coarse!r}")


def load_recipe(path: Path | None = None, quick: bool = False) -> Recipe:
    """The default recipe (its values are the pipeline's defaults), `path`'s laid over it, the
    quick one over both; an error names the file at fault."""
    recipe = load_config(Recipe, path if path is not None else DEFAULT_RECIPE,
                         base=load_yaml(DEFAULT_RECIPE) if path is not None else None)
    return load_config(Recipe, QUICK_RECIPE, base=to_dict(recipe)) if quick else recipe
