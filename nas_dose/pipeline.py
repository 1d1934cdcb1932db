"""Run the whole pipeline end to end: on the embedded synthetic data set, or on your own.

  nasdose pipeline --out DIR [--patients N] [--unlabeled M] [--grid G] [--epochs E] [--seed S] [--quick]
  nasdose pipeline --out DIR --data SRC [--grid G] [--epochs E] [--seed S]

Stages, in order, each skipped when its outputs already exist, so an interrupted pipeline
resumes where it stopped (interrupted training, search, ensemble and distillation runs resume
from their checkpoints). Delete a stage's outputs to redo it and every stage after it.

  data       DIR/data.h5                       synthetic phantoms (train / validation / test, and
                                               M unlabeled ones, without a dose, for the student);
                                               with --data, the OpenKBP tree SRC imported at the grid
                                               (a nasdose data set SRC.h5 is read where it lies)
  train      DIR/train/unet3d/                 the hand-designed 3D U-Net baseline
  search     DIR/search/pool.yaml              regularized evolution in the LENAS space: K accurate,
                                               diverse genotypes (weights inherited from a supernet)
  ensemble   DIR/ensemble/ensemble.yaml        the pool trained, selected and weighted on validation
  distill    DIR/distill/comparison.md         a compact student distilled from the ensemble, and the
                                               same student trained without distillation
  predict    DIR/predict/<model>/              validation predictions: HDF5 and OpenKBP CSVs
  evaluate   DIR/evaluate/<model>/metrics.json OpenKBP dose and DVH scores, DVH and slice plots

Every model is chosen on the validation split; the test patients are never read. It ends with
the comparison table (scores, parameters, FLOPs, CPU latency, file size) and the path of every
artifact. On a CPU with two cores or more, two networks train at once (ensemble members, and the
student beside its baseline), each on its share of the threads (nas_dose.parallel). The
synthetic default (24 phantoms at 16³ and 48 without a plan, 450 epochs) took 14 min 45 s on 2
CPU cores; on the 202 OpenKBP patients of ../shared/openkbp at 32³, --epochs 30 took 76 minutes
on one thread, one training at a time (README, "Results so far").
--quick is a smoke run for tests (tiny grid, models and budgets) whose numbers mean nothing;
with --data it checks that your data goes through every stage.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import train
from .config import ConfigError, int_at_least, layered, load_config, to_dict
from .data.cli import import_tree
from .data.store import open_data, write_dataset
from .data.synth import synth_patients
from .distill.cli import DistillConfig, run_distill
from .ensemble import EnsembleConfig, run_ensemble
from .errors import NasDoseError, input_error
from .evaluate import evaluate_predictions
from .inference import load_predictor
from .io import load_yaml, output_folder, save_yaml
from .models.unet3d import UNET3D_WIDTHS
from .predict import write_out_of_fold, write_outputs
from .progress import say
from .runtime import Runtime, RuntimeConfig
from .scores import resampling_floor
from .strategies.cli import SearchConfig, SearchRun, prepare_out
from .training import TrainConfig

EVAL_SPLIT = "validation"
# The synthetic default: 24 phantoms at 16³ and 48 more without a plan, on which the student
# learns from the teacher alone. Each ensemble member, the distilled student and its baseline
# train SYNTH_EPOCHS (--epochs; 4,050 steps), the reference U-Net half as many. Distillation
# needs a teacher clearly better than the student alone: at 300 epochs the members' ensemble
# (3.30 Gy on validation) taught a student that beat its twin in 1 of 3 seeds there (README,
# "Results so far"). On your data (--data) the default is DATA_EPOCHS at 32³.
SYNTH_GRID, SYNTH_PATIENTS, SYNTH_UNLABELED, SYNTH_EPOCHS = 16, 24, 48, 450
DATA_GRID, DATA_EPOCHS = 32, 30
# Steps of the supernet that scores the search's candidates: at 200 the 16³ search kept mostly
# shallow cells (op2 = identity) whose ensemble, trained 300 epochs, was a weaker teacher (3.43 Gy
# on validation) than the pool of a 32³ search (3.23 Gy); at 1000 it kept two deep ones.
SUPERNET_STEPS = 1000
# Adam's step for these short runs (a few hundred steps): at 60 epochs lr 1e-3 took the student
# from 4.82 to 3.99 Gy and the members from 4.62-4.98 to 4.02-4.30 Gy against the engine's 3e-4.
LR = 1e-3


STAGE_NAMES = ("train", "folds", "search", "ensemble", "distill", "cascade")
# What each stage reads from an earlier one.
NEEDS = {"folds": "train", "ensemble": "search", "distill": "ensemble"}
COARSE_STAGE = {"unet3d": "train", "ensemble": "ensemble", "student": "distill"}


@dataclass
class Recipe:
    """What `nasdose pipeline --config FILE` runs (configs/openkbp_cpu.yaml, openkbp_gpu.yaml):
    the stages in order, the grid and budget (--grid and --epochs win over them), and each
    stage's config (a TrainConfig for `train` and `cascade`, a SearchConfig, EnsembleConfig,
    DistillConfig) laid over the pipeline's defaults for it. `cascade` trains the full-resolution
    stage (nas_dose.cascade) that refines the model named by `coarse`; with the `folds` stage
    before it, it learns from out-of-fold coarse predictions of the training patients (the
    `train` stage's config trained `folds` times, each without one fold)."""

    stages: list[str] = field(default_factory=lambda: ["train", "search", "ensemble", "distill"])
    grid: int | None = None
    epochs: int | None = None
    coarse: str = "unet3d"
    folds: int = 2
    train: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    ensemble: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    cascade: dict[str, Any] = field(default_factory=dict)

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


@dataclass
class Context:
    """The pipeline's settings and the models each stage hands on to be predicted and scored."""

    out: Path
    patients: int
    grid: int
    seed: int
    quick: bool
    unlabeled: int = 0
    epochs: int = SYNTH_EPOCHS
    source: Path | None = None  # an OpenKBP tree or a nasdose data set; None: synthetic phantoms
    recipe: Recipe = field(default_factory=Recipe)
    models: dict[str, Path] = field(default_factory=dict)
    data: Path = field(init=False)  # the data set every stage reads: a given one, or DIR/data.h5

    def __post_init__(self) -> None:
        given = self.source is not None and self.source.is_file()
        self.data = self.source if given else self.out / "data.h5"


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
        import_tree(ctx.source, ctx.data, ctx.grid)
        return
    write_dataset(ctx.data, synth_patients(ctx.patients, ctx.grid, ctx.seed, ctx.unlabeled),
                  source=f"synth:seed={ctx.seed}", grid=ctx.grid, total=ctx.patients + ctx.unlabeled)


def train_overrides(ctx: Context) -> list[str]:
    """The reference model's budget: the standard unet3d (its deepest level dropped on a small
    grid) for half the members' epochs at lr LR. --quick: seconds, numbers meaningless."""
    if ctx.quick:
        return ["model.kwargs.widths=[4, 8, 16]", "epochs=2", "data.batch_size=1", "optim.lr=0.003",
                "data.augment.enabled=false", "runtime.threads=1", f"seed={ctx.seed}"]
    return [f"model.kwargs.widths={reference_widths(ctx.grid)}", f"epochs={max(1, ctx.epochs // 2)}",
            f"optim.lr={LR}", f"seed={ctx.seed}"]


def reference_widths(grid: int) -> list[int]:
    """The standard unet3d's widths, the deepest levels dropped on a small grid so the bottleneck
    keeps at least 2 voxels a side (instance norm needs more than one)."""
    return list(UNET3D_WIDTHS[:max(2, grid.bit_length() - 1)])


def _reference_run(ctx: Context) -> Path:
    return ctx.out / "train" / "unet3d"


def _train_reference(ctx: Context) -> None:
    _train(ctx, _reference_run(ctx), layered(TrainConfig, train_overrides(ctx), ctx.recipe.train, "recipe 'train'"))


def _train(ctx: Context, run: Path, config: TrainConfig) -> None:
    train.run(config, train.Inputs(ctx.data), run, resume=(run / "checkpoints" / "last.pt").exists(), official=False)


def _fold_runs(ctx: Context) -> list[Path]:
    return [ctx.out / "folds" / f"fold{k}" for k in range(ctx.recipe.folds)]


def _out_of_fold(ctx: Context) -> Path:
    return ctx.out / "folds" / "out_of_fold.h5"


def _folds(ctx: Context) -> None:
    """The reference model's config trained once per fold, then its out-of-fold predictions."""
    for k, run in enumerate(_fold_runs(ctx)):
        say(f"fold {k + 1} of {ctx.recipe.folds}")
        _train(ctx, run, layered(TrainConfig, [*train_overrides(ctx), f"data.folds={ctx.recipe.folds}",
                                               f"data.fold={k}"], ctx.recipe.train, "recipe 'train'"))
    runtime = Runtime(RuntimeConfig())
    with open_data(ctx.data) as data:
        write_out_of_fold(data, _fold_runs(ctx), _out_of_fold(ctx), runtime)


def _cascade(ctx: Context) -> None:
    """The full-resolution stage, refining the recipe's coarse model (its `cascade` config)."""
    coarse = ctx.models[ctx.recipe.coarse].resolve()
    overrides = [f"seed={ctx.seed}", f"cascade.coarse={coarse}"]
    if "folds" in ctx.recipe.stages:
        overrides += ["cascade.coarse_input=predictions", f"cascade.coarse_predictions={_out_of_fold(ctx).resolve()}"]
    if ctx.quick:
        overrides += ["model.kwargs.widths=[4, 8]", "epochs=1", "data.batch_size=1", "cascade.patch=16",
                      "data.augment.enabled=false", "runtime.threads=1"]
    _train(ctx, ctx.out / "cascade", layered(TrainConfig, overrides, ctx.recipe.cascade, "recipe 'cascade'"))


def _predict(name: str) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        runtime = Runtime(RuntimeConfig())
        with open_data(ctx.data) as data:
            write_outputs(load_predictor(ctx.models[name], runtime, data.grid), data, EVAL_SPLIT, runtime,
                          ctx.out / "predict" / name, model=str(ctx.models[name]))

    return run


def _evaluate(name: str) -> Callable[[Context], None]:
    def run(ctx: Context) -> None:
        evaluate_predictions(ctx.out / "predict" / name / "predictions.h5", ctx.data,
                             ctx.out / "evaluate" / name, split=EVAL_SPLIT, plots=1 if ctx.quick else 3)

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


def search_overrides(ctx: Context) -> list[str]:
    """Regularized evolution in the LENAS space at a CPU-sized macro (stem 8, widths 16-32-64),
    candidates scored with weights inherited from a supernet trained once on sampled paths; the
    pool of 3 is chosen for accuracy + 0.5 x prediction disagreement on validation."""
    common = ["space=lenas", "strategy=evolution", "pool_size=3", "diversity.mode=pool", "diversity.lam=0.5",
              f"seed={ctx.seed}"]
    if ctx.quick:
        return common + ["macro={stem: 2, widths: [4, 8]}", "options={budget: 4, population: 3, sample: 2, "
                         "evaluator: {supernet_steps: 4, batch_size: 1}}", "runtime.threads=1"]
    return common + ["macro={stem: 8, widths: [16, 32, 64]}", "options={budget: 16, population: 6, sample: 3, "
                     f"evaluator: {{supernet_steps: {SUPERNET_STEPS}, batch_size: 2}}}}"]


def _budget(ctx: Context) -> list[str]:
    """Member and student training: `ctx.epochs` of the standard recipe (quick: one tiny epoch),
    side by side where that is faster (`side_by_side`)."""
    budget = (["train.epochs=1", "train.data.batch_size=1", "train.data.augment.enabled=false", "runtime.threads=1"]
              if ctx.quick else [f"train.epochs={ctx.epochs}", f"train.optim.lr={LR}"])
    return budget + [f"seed={ctx.seed}", f"parallel={side_by_side(ctx.quick)}"]


def side_by_side(quick: bool) -> int:
    """Trainings at once: two on a CPU with two cores or more, where two small networks on one
    thread each take 1.6x the steps per second of the same two in turn (benchmarks/
    bench_parallel.py); one on a GPU, or in a --quick smoke run (whose trainings take less time
    than starting a process)."""
    if quick or torch.cuda.is_available():
        return 1
    return min(2, os.cpu_count() or 1)


def _stage_folder(ctx: Context, name: str) -> tuple[Path, bool]:
    """A stage's output folder, and whether it holds an interrupted run to resume."""
    out = ctx.out / name
    return out, (out / "config.yaml").exists()


def _search(ctx: Context) -> None:
    out, resume = _stage_folder(ctx, "search")
    cfg = layered(SearchConfig, search_overrides(ctx), ctx.recipe.search, "recipe 'search'")
    prepare_out(out, cfg, resume)
    SearchRun(cfg, ctx.data, out).run()


def _ensemble(ctx: Context) -> None:
    out, resume = _stage_folder(ctx, "ensemble")
    cfg = layered(EnsembleConfig, [*_budget(ctx), "selection.method=greedy", "selection.combination=weighted",
                                   f"plots={1 if ctx.quick else 3}"], ctx.recipe.ensemble, "recipe 'ensemble'")
    run_ensemble(ctx.out / "search" / "pool.yaml", ctx.data, out, cfg, resume=resume)


STUDENT = "unet3d:widths=8,16,32"  # a quarter of the members' width, no fifth level


def _distill(ctx: Context) -> None:
    out, resume = _stage_folder(ctx, "distill")
    overrides = [f"student={'unet3d:widths=2,4' if ctx.quick else STUDENT}", *_budget(ctx)]
    if ctx.quick:
        overrides += ["latency.size=16", "latency.runs=1"]
    cfg = layered(DistillConfig, overrides, ctx.recipe.distill, "recipe 'distill'")
    run_distill(ctx.out / "ensemble" / "ensemble.yaml", ctx.data, out, cfg, resume=resume)


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


def run_pipeline(ctx: Context, stages: list[Stage] | None = None) -> None:
    """Run the stages (by default the recipe's) in order, skipping those whose outputs exist."""
    stages = stages_for(ctx.recipe) if stages is None else stages
    data = ({"patients": ctx.patients, "unlabeled": ctx.unlabeled} if ctx.source is None
            else {"data": str(ctx.source.resolve())})
    settings = {**data, "grid": ctx.grid, "epochs": ctx.epochs, "seed": ctx.seed, "quick": ctx.quick,
                "recipe": to_dict(ctx.recipe)}
    record = ctx.out / "config.yaml"
    if record.exists() and (earlier := load_yaml(record)) != settings:
        raise input_error(record, f"this folder holds a pipeline run with other settings ({earlier}); "
                                  "use another --out")
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


def report(ctx: Context) -> str:
    """The score table (validation split) and every artifact's path."""
    rows = [("model", "dose score (Gy)", "DVH score (Gy)")]
    for name in ctx.models:
        scores = json.loads((ctx.out / "evaluate" / name / "metrics.json").read_text())
        rows.append((name, f"{scores['dose_score']:.3f}", f"{scores['dvh_score']:.3f}"))
    with open_data(ctx.data) as data:
        floor = resampling_floor(data, data.ids(EVAL_SPLIT))
    if floor is not None:
        rows.append((f"perfect {ctx.grid}³ dose (resampling floor)", f"{floor.dose_score:.3f}", f"{floor.dvh_score:.3f}"))
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


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--data", type=Path, metavar="SRC",
                        help="your data instead of the synthetic phantoms: an OpenKBP tree (imported at "
                             "--grid) or a data set from nasdose data import; it needs train and validation "
                             "patients with a dose")
    parser.add_argument("--patients", type=int_at_least(1),
                        help=f"synthetic patients with a dose (default {SYNTH_PATIENTS}, quick 8)")
    parser.add_argument("--unlabeled", type=int_at_least(0),
                        help="more synthetic patients without a dose, which the student learns from the "
                             f"teacher alone (default {SYNTH_UNLABELED}, quick 0)")
    parser.add_argument("--grid", type=int_at_least(1),
                        help=f"grid size (default {SYNTH_GRID} for the phantoms, {DATA_GRID} for an OpenKBP tree)")
    parser.add_argument("--epochs", type=int_at_least(1),
                        help="epochs of each ensemble member, the student and its baseline; the reference "
                             f"U-Net half as many (default {SYNTH_EPOCHS} on the phantoms, {DATA_EPOCHS} with "
                             "--data; quick: 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--config", type=Path, metavar="RECIPE.yaml",
                        help="a recipe: stages, grid, budget and each stage's config (e.g. "
                             "configs/openkbp_cpu.yaml: a coarse U-Net and its full-resolution cascade)")
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds (for tests)")


def main(args: argparse.Namespace) -> None:
    recipe = load_config(Recipe, args.config) if args.config is not None else Recipe()
    args.grid, args.epochs = args.grid or recipe.grid, args.epochs or recipe.epochs
    if args.data is not None:
        used = [flag for flag, value in (("--patients", args.patients), ("--unlabeled", args.unlabeled))
                if value is not None]
        if used:
            raise NasDoseError(f"{' and '.join(used)}: for the synthetic data set only, not with --data "
                               "(an unlabeled/ folder in an OpenKBP tree holds patients without a plan)")
        ctx = Context(out=Path(args.out), seed=args.seed, quick=args.quick, epochs=args.epochs or DATA_EPOCHS,
                      patients=0, grid=check_source(args.data, args.grid, 16 if args.quick else DATA_GRID),
                      source=args.data, recipe=recipe)
    else:
        unlabeled = args.unlabeled if args.unlabeled is not None else (0 if args.quick else SYNTH_UNLABELED)
        ctx = Context(out=Path(args.out), seed=args.seed, quick=args.quick, unlabeled=unlabeled,
                      epochs=args.epochs or SYNTH_EPOCHS, grid=args.grid or SYNTH_GRID,
                      patients=args.patients or (8 if args.quick else SYNTH_PATIENTS), recipe=recipe)
    with output_folder(ctx.out):
        run_pipeline(ctx)
    print(report(ctx))
