"""Train one network (a registered reference model or a searched genotype) on a nasdose data set.

  nasdose train --data DATA.h5 --out RUN [--config CFG.yaml] [--resume] [key=value ...]

RUN receives config.yaml (the resolved config), log.jsonl, metrics.json, curve.png (the loss
and the validation score), best.pt (the weights with the best validation dose score) and
checkpoints/last.pt, written every `checkpoint_every` steps and at each epoch end; `--resume`
continues from it exactly where the run stopped. With `prior.epochs` (a model with a dose prior,
such as latent_dose_net) RUN/prior/ first receives stage I, the model's dose autoencoder trained
on the training doses, whose decoder the model then starts from (nas_dose/training/prior.py).
On a resampled data set metrics.json also holds the official validation scores, on the source
grid (`official_val_scores`; a conditioned model's at each validation patient's own measured
preferences, as `nasdose predict --preference measured` predicts them). Each epoch prints one
line. With `logging.tensorboard=true` RUN also receives TensorBoard event files (`tensorboard --logdir RUN`):
train/loss, train/lr, val/dose_score and val/best_dose_score by step. The model is chosen
and training stops early on the validation split only, never on test patients.

Started by torchrun the run is data-parallel (DDP): data.batch_size is the global batch, each
rank steps on its share, validation is shared out and summed, and rank 0 writes the files
(docs/how-to/distributed.md); the result is that of one process up to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from . import distributed
from .cascade.objective import CascadeObjective
from .data.dataset import extra_inputs
from .data.preferences import MEASURED
from .data.store import open_data
from .inference import load_at_measured, load_predictor, official_scores, open_for
from .io import load_json, output_folder, save_json
from .models.factory import build_model
from .plots import plot_training_curve
from .progress import say
from .runtime import Runtime, seed_everything
from .training import Objective, TrainConfig, TrainResult, train_model
from .training.prior import stage_two

Config = TrainConfig


@dataclass(frozen=True)
class Inputs:
    data: Path  # a nasdose data set (.h5)


def run(config: TrainConfig, inputs: Inputs, out: Path, resume: bool = False, *,
        official: bool = True, force: bool = False) -> TrainResult:
    """Train the network `config.model` names (the full-resolution stage of a cascade when
    `config.cascade.coarse` is set) into the run folder `out`. `official`: where the data set was
    resampled, also score the chosen model as OpenKBP does (a pipeline does it in its own stage).
    `force`: an earlier run in `out` is removed and training starts afresh."""
    # recorded absolute (config.yaml, checkpoints): predict and --resume find it from anywhere
    config = replace(config, cascade=config.cascade.resolved())
    seed_everything(config.seed)
    cascade = config.cascade.coarse is not None
    model = build_model(config.model, refiner=cascade, extra=extra_inputs(inputs.data, config.data.hide))
    with output_folder(out, replace=force):
        objective: Objective | None = CascadeObjective(config, inputs.data) if cascade else None
        if config.prior.epochs:
            objective = stage_two(model, config, inputs.data, Path(out) / "prior", resume)
        result = train_model(model, config, inputs.data, out, resume=resume, objective=objective)
        with open_data(inputs.data) as data:
            grid = "patches" if cascade else f"{data.grid}³ grid"
        say(f"best validation dose score {result.best_val_score:.3f} Gy on the {grid} at epoch {result.best_epoch} "
            f"(all-zero prediction: {result.zero_val_score:.3f} Gy); model: {Path(out) / 'best.pt'}")
        if distributed.writes_here():
            plot_training_curve(result.history, Path(out) / "curve.png")
            if official:
                _report_official(out, Path(inputs.data), config)
    return result


def interrupted(run: Path) -> bool:
    """Whether the run folder holds a checkpoint to resume from: the run's own, or its dose
    prior's (a run stopped in stage I)."""
    return any((folder / "checkpoints" / "last.pt").exists() for folder in (Path(run), Path(run) / "prior"))


def _report_official(run: Path, data: Path, config: TrainConfig) -> None:
    """Where the data set was resampled (or the run refines a coarse stage), the checkpoint was
    chosen on a proxy: score it as OpenKBP does, on the source grid, into metrics.json.

    A conditioned model is asked for each validation patient's own measured preferences (the
    one plan the source grid holds; `nasdose predict --preference measured`). Preference plans
    are stored on the data set's grid only: where the validation patients hold them, each plan
    is scored against its own dose there, by the validation score, and no official one is made."""
    conditioned = config.model.conditioning is not None
    with open_for(data, run) as d:
        ids = d.ids(config.data.val_split)
        if config.cascade.coarse is None and all(d.source_grid(pid) == d.grid for pid in ids):
            return
        if conditioned and any(d.n_plans(pid) for pid in ids):
            say("official scores: not computed (the validation patients' preference plans are on the data set's "
                "grid only; the validation score scores each against its own plan)")
            return
        runtime = Runtime(config.runtime)
        predictor = load_at_measured(Path(run), runtime) if conditioned else load_predictor(Path(run), runtime)
        scores = official_scores(predictor, d, ids, runtime)
    at = {"preferences": MEASURED} if conditioned else {}
    metrics = load_json(Path(run) / "metrics.json")
    save_json(Path(run) / "metrics.json", {**metrics, "official_val_scores": {
        "dose_score": scores.dose_score, "dvh_score": scores.dvh_score, "patients": len(ids),
        "grid": d.source_grid(ids[0]), **at}})
    say(f"official validation scores (OpenKBP, {d.source_grid(ids[0])}³ source grid, {len(ids)} patients"
        f"{', each at its own measured preferences' if conditioned else ''}): "
        f"dose {scores.dose_score:.3f} Gy, DVH {scores.dvh_score:.3f} Gy")
