"""Run the whole pipeline end to end: on the embedded synthetic data set, or on your own.

  nasdose pipeline --out DIR [--patients N] [--unlabeled M] [--grid G] [--epochs E] [--seed S] [--quick]
  nasdose pipeline --out DIR --data SRC [--config RECIPE.yaml] [--grid G] [--epochs E] [--seed S]

What runs is a recipe (configs/pipeline.yaml, the default; configs/openkbp_cpu.yaml and
openkbp_gpu.yaml for the OpenKBP patients): the stages in order and each stage's config. A
recipe given with --config is laid over the default one; --quick lays configs/pipeline_quick.yaml
(tiny models and budgets: a smoke run whose numbers mean nothing) over that.

Stages, in order, each skipped when its outputs already exist, so an interrupted pipeline
resumes where it stopped (interrupted training, search, ensemble and distillation runs resume
from their checkpoints). Delete a stage's outputs to redo it and every stage after it; --force
redoes them all (DIR's earlier run is removed first).

  data       DIR/data.h5                       synthetic phantoms (train / validation / test, and
                                               M unlabeled ones, without a dose, for the student);
                                               with --data, the OpenKBP tree SRC imported at the grid
                                               (a nasdose data set SRC.h5 is read where it lies)
  train      DIR/train/unet3d/                 the hand-designed 3D U-Net baseline
  folds      DIR/folds/                        the same U-Net once per fold: out-of-fold predictions
  search     DIR/search/pool.yaml              regularized evolution in the LENAS space: K accurate,
                                               diverse genotypes (weights inherited from a supernet)
  ensemble   DIR/ensemble/ensemble.yaml        the pool trained, selected and weighted on validation
  distill    DIR/distill/comparison.md         a compact student distilled from the ensemble, and the
                                               same student trained without distillation
  cascade    DIR/cascade/                      the full-resolution stage refining a coarse model
  predict    DIR/predict/<model>/              validation predictions: HDF5 and OpenKBP CSVs
  evaluate   DIR/evaluate/<model>/metrics.json OpenKBP dose and DVH scores, DVH and slice plots

Every model is chosen on the validation split; the test patients are never read. It ends with
the score table (OpenKBP scores on the source grid where the data set was resampled, with its
resampling floor), the student's comparison table and the path of every artifact. On a CPU with
two cores or more, two networks train at once (ensemble members, and the student beside its
baseline), each on its share of the threads (nas_dose.parallel).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from nas_dose.distill import distill
from nas_dose.strategies import search

from . import ensemble, evaluate, predict, train
from .config import deep_merge, layered, to_dict
from .data import importer, synth
from .data.store import open_data
from .errors import input_error
from .io import load_yaml, output_folder, save_yaml
from .models.unet3d import UNET3D_WIDTHS
from .predict import write_out_of_fold
from .progress import say
from .recipe import Recipe
from .runtime import Runtime, RuntimeConfig
from .scores import resampling_floor
from .training import TrainConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Config = Recipe  # laid over the default recipe: nas_dose.recipe.load_recipe
EVAL_SPLIT = "validation"
C = TypeVar("C", bound="DataclassInstance")


@dataclass(frozen=True)
class Inputs:
    data: Path | None = None  # an OpenKBP tree or a nasdose data set; None: synthetic phantoms


@dataclass
class Context:
    """The pipeline's settings and the models each stage hands on to be predicted and scored."""

    out: Path
    recipe: Recipe
    grid: int
    epochs: int
    source: Path | None = None  # an OpenKBP tree or a nasdose data set; None: synthetic phantoms
    models: dict[str, Path] = field(default_factory=dict)
    data: Path = field(init=False)  # the data set every stage reads: a given one, or DIR/data.h5

    def __post_init__(self) -> None:
        given = self.source is not None and self.source.is_file()
        self.data = self.source if self.source is not None and given else self.out / "data.h5"

    def config(self, cls: type[C], section: str, base: dict[str, Any]) -> C:
        """Stage `section`'s config: the pipeline's `base` (seed, budget), the recipe's on top."""
        return layered(cls, base, getattr(self.recipe, section), f"recipe '{section}'")


def check_source(source: Path, grid: int | None, default_grid: int) -> int:
    """A user's data for the pipeline: a data set with training and validation doses, or an
    OpenKBP tree; the grid to run at (a data set's own; a tree is imported at `grid`)."""
    if not source.exists():
        raise input_error(source, "not found")
    if not source.is_file():
        return grid or default_grid
    with open_data(source) as data:
        if data.kind != "dataset":
            raise input_error(source, "a prediction file, not a data set")
        for split in ("train", EVAL_SPLIT):
            ids = data.ids(split)
            with_dose = sum(data.has_dose(pid) for pid in ids)
            if not ids or with_dose < len(ids):
                raise input_error(source, f"the pipeline needs {split} patients with a dose "
                                          f"({len(ids)} {split} patients, {with_dose} with a dose)")
        if grid is not None and grid != data.grid:
            raise input_error(source, f"holds a {data.grid}^3 grid, not --grid {grid} (import the tree again "
                                      "with nasdose data import --grid, or leave --grid out)")
        return data.grid


@dataclass(frozen=True)
class Stage:
    """One step: done when every path of `outputs(ctx)` exists, else `run(ctx)` makes them.

    A stage that produces a model names it in `model` (name, path); the pipeline then predicts
    and scores that model on the validation split, whether the stage ran now or earlier.
    """

    name: str
    outputs: Callable[[Context], list[Path]]
    run: Callable[[Context], None]
    model: tuple[str, Callable[[Context], Path]] | None = None


def _make_data(ctx: Context) -> None:
    if ctx.source is not None:
        importer.run(importer.Config(grid=ctx.grid), importer.Inputs(ctx.source), ctx.data)
        return
    data = ctx.recipe.synthetic
    synth.run(synth.Config(patients=data.patients, unlabeled=data.unlabeled, grid=ctx.grid, seed=ctx.recipe.seed),
              synth.Inputs(), ctx.data)


def reference_widths(grid: int) -> list[int]:
    """The standard unet3d's widths, the deepest levels dropped on a small grid so the bottleneck
    keeps at least 2 voxels a side (instance norm needs more than one)."""
    return list(UNET3D_WIDTHS[:max(2, grid.bit_length() - 1)])


def train_base(ctx: Context) -> dict[str, Any]:
    """The reference model: the standard unet3d (fitted to the grid), half the members' epochs."""
    return {"model": {"kwargs": {"widths": reference_widths(ctx.grid)}}, "epochs": max(1, ctx.epochs // 2),
            "seed": ctx.recipe.seed}


def _reference_run(ctx: Context) -> Path:
    return ctx.out / "train" / "unet3d"


def _train(run: Path, config: TrainConfig, ctx: Context) -> None:
    train.run(config, train.Inputs(ctx.data), run, resume=train.interrupted(run), official=False)


def _train_reference(ctx: Context) -> None:
    _train(_reference_run(ctx), ctx.config(TrainConfig, "train", train_base(ctx)), ctx)


def _fold_runs(ctx: Context) -> list[Path]:
    return [ctx.out / "folds" / f"fold{k}" for k in range(ctx.recipe.folds)]


def _out_of_fold(ctx: Context) -> Path:
    return ctx.out / "folds" / "out_of_fold.h5"


def _folds(ctx: Context) -> None:
    """The reference model's config trained once per fold, then its out-of-fold predictions."""
    for k, run in enumerate(_fold_runs(ctx)):
        say(f"fold {k + 1} of {ctx.recipe.folds}")
        base = deep_merge(train_base(ctx), {"data": {"folds": ctx.recipe.folds, "fold": k}})
        _train(run, ctx.config(TrainConfig, "train", base), ctx)
    runtime = Runtime(RuntimeConfig())
    with open_data(ctx.data) as data:
        write_out_of_fold(data, _fold_runs(ctx), _out_of_fold(ctx), runtime)


def _cascade(ctx: Context) -> None:
    """The full-resolution stage, refining the recipe's coarse model (its `cascade` config)."""
    cascade: dict[str, Any] = {"coarse": str(ctx.models[ctx.recipe.coarse].resolve())}
    if "folds" in ctx.recipe.stages:
        cascade.update(coarse_input="predictions", coarse_predictions=str(_out_of_fold(ctx).resolve()))
    _train(ctx.out / "cascade", ctx.config(TrainConfig, "cascade", {"seed": ctx.recipe.seed, "cascade": cascade}), ctx)


# A prediction or its scores run again only because the model did (or they were incomplete):
# the earlier ones are stale, so they are replaced (force).
def _predict(name: str) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        config = ctx.config(predict.Config, "predict", {"split": EVAL_SPLIT})
        predict.run(config, predict.Inputs(ctx.models[name], ctx.data), ctx.out / "predict" / name, force=True)

    return run


def _evaluate(name: str) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        config = ctx.config(evaluate.Config, "evaluate", {"split": EVAL_SPLIT})
        evaluate.run(config, evaluate.Inputs(ctx.out / "predict" / name / "predictions.h5", ctx.data),
                     ctx.out / "evaluate" / name, force=True)

    return run


def scored(stage: Stage) -> list[Stage]:
    """A model-producing stage, then the stages that predict and score its model on validation."""
    if stage.model is None:
        raise ValueError(f"stage {stage.name!r} produces no model to score")
    name = stage.model[0]
    predictions, scores = Path("predict") / name, Path("evaluate") / name
    return [
        stage,
        Stage(f"predict {name}", lambda ctx: [ctx.out / predictions / "predictions.h5",
                                              ctx.out / predictions / "submission",
                                              ctx.out / predictions / "config.yaml"], _predict(name)),
        Stage(f"evaluate {name}", lambda ctx: [ctx.out / scores / "metrics.json"], _evaluate(name)),
    ]


def side_by_side(quick: bool) -> int:
    """Trainings at once: two on a CPU with two cores or more, where two small networks on one
    thread each beat the same two in turn (benchmarks/bench_parallel.py measures it); one on a
    GPU, or in a --quick smoke run (whose trainings take less time than starting a process)."""
    if quick or torch.cuda.is_available():
        return 1
    return min(2, os.cpu_count() or 1)


def members_base(ctx: Context) -> dict[str, Any]:
    """Member and student training: `ctx.epochs` each, side by side where that is faster."""
    return {"train": {"epochs": ctx.epochs}, "seed": ctx.recipe.seed, "parallel": side_by_side(ctx.recipe.quick)}


def _stage_folder(ctx: Context, name: str) -> tuple[Path, bool]:
    """A stage's output folder, and whether it holds an interrupted run to resume."""
    out = ctx.out / name
    return out, (out / "config.yaml").exists()


def _search(ctx: Context) -> None:
    out, resume = _stage_folder(ctx, "search")
    search.run(ctx.config(search.Config, "search", {"seed": ctx.recipe.seed}), search.Inputs(ctx.data), out, resume)


def _ensemble(ctx: Context) -> None:
    out, resume = _stage_folder(ctx, "ensemble")
    ensemble.run(ctx.config(ensemble.Config, "ensemble", members_base(ctx)),
                 ensemble.Inputs(ctx.out / "search" / "pool.yaml", ctx.data), out, resume)


def _distill(ctx: Context) -> None:
    out, resume = _stage_folder(ctx, "distill")
    distill.run(ctx.config(distill.Config, "distill", members_base(ctx)),
                distill.Inputs(ctx.out / "ensemble" / "ensemble.yaml", ctx.data), out, resume)


STAGES: dict[str, list[Stage]] = {
    "train": scored(Stage("train unet3d", lambda ctx: [_reference_run(ctx) / "metrics.json"], _train_reference,
                          model=("unet3d", _reference_run))),
    "folds": [Stage("folds", lambda ctx: [_out_of_fold(ctx)], _folds)],
    "search": [Stage("search", lambda ctx: [ctx.out / "search" / "pool.yaml"], _search)],
    "ensemble": scored(Stage("ensemble", lambda ctx: [ctx.out / "ensemble" / "ensemble.yaml"], _ensemble,
                             model=("ensemble", lambda ctx: ctx.out / "ensemble" / "ensemble.yaml"))),
    "distill": scored(Stage("distill", lambda ctx: [ctx.out / "distill" / "comparison.md"], _distill,
                            model=("student", lambda ctx: ctx.out / "distill" / "student"))),
    "cascade": scored(Stage("cascade", lambda ctx: [ctx.out / "cascade" / "metrics.json"], _cascade,
                            model=("cascade", lambda ctx: ctx.out / "cascade"))),
}


def stages_for(recipe: Recipe) -> list[Stage]:
    """The data stage, then the recipe's stages, each model followed by its prediction and scores."""
    return [Stage("data", lambda ctx: [ctx.data], _make_data),
            *(stage for name in recipe.stages for stage in STAGES[name])]


def context(recipe: Recipe, inputs: Inputs, out: Path) -> Context:
    """The grid and budget the data calls for: a data set's own grid, else the recipe's, else the
    data's default (`synthetic` or `real`)."""
    if inputs.data is None:
        data = recipe.synthetic
        return Context(Path(out), recipe, recipe.grid or data.grid, recipe.epochs or data.epochs)
    grid = check_source(Path(inputs.data), recipe.grid, recipe.real.grid)
    return Context(Path(out), recipe, grid, recipe.epochs or recipe.real.epochs, Path(inputs.data))


def run_stages(ctx: Context, stages: list[Stage] | None = None) -> None:
    """Run the stages (by default the recipe's) in order, skipping those whose outputs exist."""
    stages = stages_for(ctx.recipe) if stages is None else stages
    data = {"data": str(ctx.source.resolve())} if ctx.source is not None else {}
    settings = {**data, "grid": ctx.grid, "epochs": ctx.epochs, "recipe": to_dict(ctx.recipe)}
    record = ctx.out / "config.yaml"
    if record.exists() and (earlier := load_yaml(record)) != settings:
        raise input_error(record, f"this folder holds a pipeline run with other settings ({earlier}); "
                                  "give --force to replace it, or use another --out")
    save_yaml(record, settings)
    redo = False  # once a stage runs, the stages after it may read its new outputs: run them too
    for i, stage in enumerate(stages, start=1):
        if not redo and all(p.exists() for p in stage.outputs(ctx)):
            say(f"[{i}/{len(stages)}] {stage.name}: done already, skipped")
        else:
            say(f"[{i}/{len(stages)}] {stage.name}")
            stage.run(ctx)
            redo = True
        if stage.model is not None:
            name, path = stage.model
            ctx.models[name] = path(ctx)


def run(config: Recipe, inputs: Inputs, out: Path, resume: bool = True, *, force: bool = False) -> str:
    """Every stage of the recipe into `out`; returns the report. A pipeline always resumes (each
    stage is skipped where its outputs exist, an interrupted one continues from its checkpoint):
    `resume` is there for the shape every stage shares. `force` removes an earlier pipeline run
    in `out` first, and every stage runs afresh."""
    ctx = context(config, inputs, out)
    with output_folder(ctx.out, replace=force):
        run_stages(ctx)
    return report(ctx)


def report(ctx: Context) -> str:
    """The score table (validation split) and every artifact's path."""
    rows = [("model", "dose score (Gy)", "DVH score (Gy)")]
    for name in ctx.models:
        scores = json.loads((ctx.out / "evaluate" / name / "metrics.json").read_text())
        rows.append((name, f"{scores['dose_score']:.3f}", f"{scores['dvh_score']:.3f}"))
    with open_data(ctx.data) as data:
        floor = resampling_floor(data, data.ids(EVAL_SPLIT))
    if floor is not None:
        rows.append((f"perfect {ctx.grid}³ dose (resampling floor)", f"{floor.dose_score:.3f}",
                     f"{floor.dvh_score:.3f}"))
    if (_reference_run(ctx) / "metrics.json").exists():
        reference = json.loads((_reference_run(ctx) / "metrics.json").read_text())
        rows.append(("all-zero dose", f"{reference.get('zero_dose_val_score', math.nan):.3f}", "-"))
    width = max(len(r[0]) for r in rows) + 2
    where = "" if floor is None else f", OpenKBP scores on the {data.source_grid(data.ids(EVAL_SPLIT)[0])}³ source grid"
    lines = [f"scores on the {EVAL_SPLIT} patients{where}:"]
    lines += [f"  {a:<{width}}{b:>16}{c:>16}" for a, b, c in rows]
    artifacts = [("data set", ctx.data)]
    for name, model in ctx.models.items():
        artifacts += [(f"{name} model", model), (f"{name} predictions", ctx.out / "predict" / name),
                      (f"{name} scores and plots", ctx.out / "evaluate" / name)]
    comparison = ctx.out / "distill" / "comparison.md"
    if comparison.exists():
        table = [line for line in comparison.read_text().splitlines() if line.startswith("|")]
        lines += ["", "ensemble vs student (validation; from the distill stage):", *table]
    if "search" in ctx.recipe.stages:
        artifacts.append(("search pool and plots", ctx.out / "search"))
    if comparison.exists():
        artifacts.append(("distillation report", comparison))
    width = max(len(a) for a, _ in artifacts) + 2
    lines += ["", "artifacts:"] + [f"  {a:<{width}}{p}" for a, p in artifacts]
    return "\n".join(lines)
