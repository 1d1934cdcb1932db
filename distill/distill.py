"""Distil an ensemble into one compact student network (LENAS's KDA-Net, done right).

  nasdose distill ENSEMBLE.yaml --student SPEC --data DATA.h5 --out DIR [--config CFG.yaml]
                  [--resume] [--baseline | --no-baseline] [--export] [--teacher-cache FILE]
                  [key=value ...]

ENSEMBLE.yaml is an ensemble written by `nasdose ensemble` (a training run folder or a
checkpoint works too: one network as the teacher). SPEC names the student's architecture:

  unet3d:widths=8,16,32       a registered model and its arguments (a list with commas; more
                              arguments with ':', e.g. unet3d:widths=8,16,32:norm=batch)
  student.yaml                a YAML file with a `model` section as in a training config
                              ({name: unet3d, kwargs: {widths: [8, 16, 32]}}), or a genotype
  genotype.yaml:width=0.5     a genotype with the stem and widths of its macro scaled by 0.5

The student minimizes  (alpha_gt + alpha_teacher) · L1(pred, blend), the blend being the
weighted mean of the dose and the teacher's prediction (combine=sum: alpha_gt · L1(pred, dose)
+ alpha_teacher · L1(pred, teacher)) [+ hint.weight · feature hints] [+ adversarial.weight · a
trained discriminator's term] (see nas_dose.distill.losses). alpha_gt=0 drops the reference
dose, only when asked for, with a warning. Patients of the data set's "unlabeled" split
(contours, no plan; `unlabeled.split`) are trained on beside the training split with the
teacher's term alone, the student's epochs cut so it takes as many steps as the baseline
(`unlabeled.same_steps`). Hints (one member runs online for its features) and the adversarial
term (its discriminator trained by its own optimizer) are off by default; configs/distill.yaml
lists every key. Its training is `nasdose train`'s (`train.*` keys: epochs, optim, data.augment,
...), with the teacher's prediction augmented like the input; the checkpoint is chosen on the
validation dose score against the reference dose.

DIR receives:
  teacher.h5        the teacher's predictions of the training, unlabeled and validation patients,
                    made once; reused by --resume and by later runs given it as --teacher-cache
  student/          the student's training run: best.pt (`nasdose predict --model DIR/student`)
  baseline/         the same architecture, same initial weights and budget, trained without the
                    teacher (--no-baseline skips it)
  comparison.md     student, ensemble, best single member and baseline on validation dose and DVH
                    scores, parameters, FLOPs, latency, checkpoint size (also printed)
  metrics.json      the same numbers, the training records and the settings; teacher_recomputed:
                    whether the run (at any of its starts) computed the teacher's predictions,
                    false when it reused a cache made before it (--teacher-cache)
  student.pt2       with --export: the student as a torch.export program (batch 1, data grid)
  config.yaml       the resolved config

--resume continues an interrupted run: the cached teacher predictions and finished trainings
are reused and a half-trained one resumes from its last checkpoint.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas_dose import distributed
from nas_dose.config import ConfigError, at_least, check_run_folder, save_config
from nas_dose.data.dataset import IN_CHANNELS
from nas_dose.data.store import SPLITS, open_data
from nas_dose.errors import NasDoseError, input_error
from nas_dose.inference import Ensemble, load_model_or_ensemble
from nas_dose.io import atomic_path, load_json, output_folder, save_json, write_text
from nas_dose.models.factory import ModelConfig, build_model, load_model
from nas_dose.models.spec import resolve_student
from nas_dose.parallel import run_side_by_side, worker_threads
from nas_dose.progress import say
from nas_dose.runtime import Runtime, RuntimeConfig, seed_everything
from nas_dose.scores import Scores, score_on_source
from nas_dose.training import Objective, TrainConfig, train_model

from .losses import AdversarialConfig, Combine, DistillObjective, HintConfig, check_non_negative
from .report import Row, comparison_table, cost, score_predictor
from .teacher import cache_is_current, ensure_cache, member_checkpoints, teacher_files, teacher_key


@dataclass
class LatencyConfig:
    """Latency is the median of `runs` forward passes on one `size`³ volume (batch 1)."""

    size: int = 128
    runs: int = 3

    def validate(self) -> None:
        for key in ("size", "runs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'latency.{key}': must be at least 1, got {getattr(self, key)}")


@dataclass
class UnlabeledConfig:
    """Patients with contours but no plan, in the data set's `split`: the student learns from the
    teacher alone on them, beside the training split (a split that is absent or empty adds
    nothing; null: none). With `same_steps` the student's epochs are cut to
    epochs · labeled / (labeled + unlabeled), so it takes as many optimizer steps as the baseline."""

    split: str | None = "unlabeled"
    same_steps: bool = True

    def validate(self) -> None:
        if self.split is not None and self.split not in SPLITS:
            raise ConfigError(f"config key 'unlabeled.split': expected one of {', '.join(SPLITS)} or null, "
                              f"got {self.split!r}")


@dataclass
class DistillConfig:
    """The student (`student`: a SPEC, or --student), its training (`train`, whose model, seed and
    runtime are set by `student`, `seed` and `runtime`), the loss weights, and the report.
    `parallel: 2` trains the student and the baseline at once, in two processes sharing
    `runtime.threads` (nas_dose.parallel); not under torchrun."""

    student: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    alpha_gt: float = 1.0
    alpha_teacher: float = 1.0
    combine: Combine = "blend"
    unlabeled: UnlabeledConfig = field(default_factory=UnlabeledConfig)
    hint: HintConfig = field(default_factory=HintConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    baseline: bool = True
    export: bool = False
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    seed: int = 0
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    parallel: int = 1

    def validate(self) -> None:
        for key, default, owner in (("model", ModelConfig(), "student"), ("runtime", RuntimeConfig(), "runtime"),
                                    ("seed", 0, "seed")):
            if getattr(self.train, key) != default:
                raise ConfigError(f"config key 'train.{key}': the student's {key} is set by the top-level "
                                  f"'{owner}'; leave it out")
        for key in ("alpha_gt", "alpha_teacher"):
            check_non_negative(key, getattr(self, key))
        at_least("seed", self.seed, 0)
        at_least("parallel", self.parallel, 1)
        if self.unlabeled.split in (self.train.data.train_split, self.train.data.val_split):
            raise ConfigError(f"config key 'unlabeled.split': '{self.unlabeled.split}' is the training or "
                              "validation split; its patients have a plan")


BASELINE = "student arch., no distillation"
# Keys that change what the student learns: a resumed run must keep them.
TRAINING_KEYS = ("student", "train", "alpha_gt", "alpha_teacher", "combine", "unlabeled", "hint", "adversarial",
                 "seed")


def student_epochs(cfg: DistillConfig, labeled: int, unlabeled: int) -> int:
    """The student's epochs: those of `train`, cut with unlabeled patients under `same_steps` so
    that its optimizer steps (batches per epoch x epochs) stay about the baseline's (unchanged
    when `train.steps_per_epoch` fixes the steps)."""
    if not unlabeled or not cfg.unlabeled.same_steps or cfg.train.steps_per_epoch is not None:
        return cfg.train.epochs
    return max(1, round(cfg.train.epochs * labeled / (labeled + unlabeled)))


def _check_teacher(out: Path, teacher: Path, data: Path, key: str, cache: Path, ids: list[str], grid: int) -> bool:
    """Record which teacher and data the student learns from (a resumed student must keep them)
    and whether the run computes the teacher's predictions, at this start or an earlier one;
    returns the latter. Recorded before the teacher runs: a run stopped once its cache is made
    reports it computed on resume, as the uninterrupted run does."""
    record = out / "teacher.json"
    old = load_json(record) if record.exists() else {}
    if record.exists() and (out / "student").exists() and old.get("key") != key:
        raise input_error(record, "the student was distilled from another teacher or data set; "
                                  "resume with those or choose another --out")
    computed_before = old.get("key") == key and old.get("recomputed", False)
    recomputed = computed_before or not cache_is_current(cache, key, ids, grid)
    save_json(record, {"teacher": str(teacher), "data": str(data), "key": key, "recomputed": recomputed})
    return recomputed


def _hint_member(teacher: nn.Module, hint: HintConfig) -> nn.Module:
    """The ensemble member whose features the hints match: `hint.member`, else the heaviest."""
    if not isinstance(teacher, Ensemble):
        return teacher
    weights = teacher.weights
    index = hint.member if hint.member is not None else max(range(len(weights)), key=weights.__getitem__)
    if not 0 <= index < len(weights):
        raise ConfigError(f"config key 'hint.member': the ensemble has {len(weights)} members, got {index}")
    return teacher.members[index]


def _train(cfg: TrainConfig, data: Path, folder: Path, objective: Objective | None) -> dict[str, Any]:
    """Train (or resume, or reuse when finished) one run; its training metrics.json (written last,
    by the main rank: the other ranks take the main rank's view of it)."""
    record = folder / "metrics.json"
    if not distributed.on_main(record.exists):
        seed_everything(cfg.seed)
        train_model(build_model(cfg.model), cfg, data, folder, resume=True, objective=objective)
    return distributed.on_main(load_json, record)


def _file_size(*files: Path) -> int:
    return sum(f.stat().st_size for f in files)


def _model_row(name: str, arch: str, model: nn.Module, files: list[Path], data: Path, ids: list[str],
               grid: int, cfg: DistillConfig, runtime: Runtime, scores: Scores | None = None) -> Row:
    s = scores or score_predictor(runtime.prepare(model).eval(), data, ids, runtime)
    return Row(name, arch, s.dose_score, s.dvh_score, checkpoint_bytes=_file_size(*files),
               **cost(model, grid, cfg.latency.size, cfg.latency.runs))  # type: ignore[arg-type]


def _architecture(model_config: dict[str, Any]) -> str:
    genotype = model_config.get("genotype")
    if genotype is not None:
        macro = genotype["macro"]
        return f"{genotype['space']} genotype, stem {macro['stem']}, widths {','.join(map(str, macro['widths']))}"
    kwargs = ", ".join(f"{k}={v}" for k, v in model_config.get("kwargs", {}).items())
    return f"{model_config['name']}({kwargs})"


def _rows(teacher_path: Path, teacher: nn.Module, cache: Path, out: Path, data: Path, ids: list[str],
          grid: int, cfg: DistillConfig, runtime: Runtime) -> list[Row]:
    """Student, ensemble, best single member (for an ensemble teacher), baseline."""
    rows = []
    model, meta = load_model(out / "student")
    arch = _architecture(meta["model_config"])
    rows.append(_model_row("student (distilled)", arch, model, [out / "student" / "best.pt"], data, ids, grid,
                           cfg, runtime))
    with open_data(data) as d, open_data(cache) as c:
        s = score_on_source(d, ((pid, c.read_dose(pid)) for pid in ids))
    n = len(teacher.members) if isinstance(teacher, Ensemble) else 1
    rows.append(Row(f"ensemble (teacher, {n} member{'s' if n > 1 else ''})", "ensemble" if n > 1 else "teacher",
                    s.dose_score, s.dvh_score, checkpoint_bytes=_file_size(*teacher_files(teacher_path)),
                    **cost(teacher, grid, cfg.latency.size, cfg.latency.runs)))  # type: ignore[arg-type]
    if isinstance(teacher, Ensemble):
        singles = [Ensemble([m], [1.0], teacher.tta) for m in teacher.members]
        scores = [score_predictor(runtime.prepare(m).eval(), data, ids, runtime) for m in singles]
        best = min(range(n), key=lambda i: scores[i].dose_score)
        checkpoint = member_checkpoints(teacher_path)[best]
        rows.append(_model_row(f"best single member ({teacher.names[best]})",
                               _architecture(load_model(checkpoint)[1]["model_config"]), singles[best],
                               [checkpoint], data, ids, grid, cfg, runtime, scores[best]))
    if cfg.baseline:
        model, _ = load_model(out / "baseline")
        rows.append(_model_row(BASELINE, arch, model, [out / "baseline" / "best.pt"],
                               data, ids, grid, cfg, runtime))
    return rows


def export_student(model: nn.Module, grid: int, path: Path) -> None:
    """The student as a torch.export program for (1, IN_CHANNELS, grid, grid, grid) inputs."""
    example = torch.zeros(1, IN_CHANNELS, grid, grid, grid)
    program = torch.export.export(model.eval(), (example,))
    buffer = io.BytesIO()  # saved whole, then written atomically under its own name
    torch.export.save(program, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def run_distill(teacher: Path, data: Path, out: Path, cfg: DistillConfig, resume: bool = False,
                teacher_cache: Path | None = None) -> dict[str, Any]:
    """The whole command: cache the teacher, train the student (and the baseline), compare."""
    teacher, data, out = Path(teacher), Path(data), Path(out)
    if cfg.student is None:
        raise NasDoseError("no student: give --student SPEC (or 'student' in the config)")
    split, val_split = cfg.train.data.train_split, cfg.train.data.val_split
    with open_data(data) as d:
        if d.kind != "dataset":
            raise input_error(data, f"a nasdose {d.kind} file, expected a data set")
        train_ids, val_ids, grid = d.ids(split), d.ids(val_split), d.grid
        unlabeled_ids = d.ids(cfg.unlabeled.split) if cfg.unlabeled.split is not None else []
    for name, ids in ((split, train_ids), (val_split, val_ids)):
        if not ids:
            raise input_error(data, f"no patients in split '{name}'")
    if unlabeled_ids and cfg.alpha_teacher == 0:
        raise ConfigError(f"alpha_teacher = 0: the {len(unlabeled_ids)} unlabeled patients of {data} would teach "
                          "nothing; set unlabeled.split=null to leave them out")
    predictor = load_model_or_ensemble(teacher, grid)
    # Under torchrun the student and the baseline train data-parallel, the ranks predict the
    # teacher's patients between them; the steps that check or write files (and report) run on
    # the main rank alone.
    distributed.on_main(check_run_folder, out, cfg, resume, "a distillation run", out / "student", TRAINING_KEYS)
    student = distributed.on_main(resolve_student, cfg.student, out)
    save_config(out / "config.yaml", cfg)
    runtime = Runtime(cfg.runtime)
    key = teacher_key(teacher, data)
    cache = Path(teacher_cache) if teacher_cache is not None else out / "teacher.h5"
    ids = train_ids + unlabeled_ids + val_ids
    recomputed = distributed.on_main(_check_teacher, out, teacher, data, key, cache, ids, grid)
    ensure_cache(cache, key, data, ids, lambda: runtime.prepare(predictor).eval(), runtime)
    train_cfg = replace(cfg.train, model=student, seed=cfg.seed, runtime=cfg.runtime)
    student_cfg = replace(train_cfg, epochs=student_epochs(cfg, len(train_ids), len(unlabeled_ids)))
    objective = DistillObjective(cache, cfg.alpha_gt, cfg.alpha_teacher, cfg.hint, cfg.adversarial,
                                 hint_teacher=_hint_member(predictor, cfg.hint) if cfg.hint.weight > 0 else None,
                                 combine=cfg.combine, unlabeled_split=cfg.unlabeled.split if unlabeled_ids else None)
    say(f"distilling {teacher} into {cfg.student}"
        + (f", with {len(unlabeled_ids)} unlabeled patients taught by the teacher alone "
           f"({student_cfg.epochs} epochs)" if unlabeled_ids else "")
        + (", and training the same architecture without distillation (baseline)" if cfg.baseline else ""))
    jobs: list[tuple[TrainConfig, Path, Path, Objective | None]] = [(student_cfg, data, out / "student", objective)]
    if cfg.baseline:
        jobs.append((train_cfg, data, out / "baseline", None))
    workers = min(cfg.parallel, len(jobs))
    if workers > 1:
        threads = worker_threads(workers, cfg.runtime.threads)
        jobs = [(replace(c, runtime=replace(c.runtime, threads=threads)), d, o, obj) for c, d, o, obj in jobs]
        say(f"student and baseline side by side, {threads} thread(s) each")
    records = run_side_by_side(_train, jobs, workers)
    student_record, baseline_record = records[0], (records[1] if cfg.baseline else None)
    context = {"teacher": str(teacher), "data": str(data), "student": cfg.student, "teacher_key": key,
               "teacher_cache": str(cache), "teacher_recomputed": recomputed,
               "training_patients": {"labeled": len(train_ids), "unlabeled": len(unlabeled_ids)},
               "epochs": {"student": student_cfg.epochs, "baseline": train_cfg.epochs},
               "student_training": student_record, "baseline_training": baseline_record}
    return distributed.on_main(_report, teacher, predictor.cpu(), cache, out, data, val_ids, grid, cfg, runtime,
                               context)


def _report(teacher: Path, predictor: nn.Module, cache: Path, out: Path, data: Path, val_ids: list[str],
            grid: int, cfg: DistillConfig, runtime: Runtime, context: dict[str, Any]) -> dict[str, Any]:
    """The table (printed, comparison.md), metrics.json and the export."""
    rows = _rows(teacher, predictor, cache, out, data, val_ids, grid, cfg, runtime)
    table = comparison_table(rows, grid, cfg.latency.size)
    note = (f"Validation split '{cfg.train.data.val_split}', {len(val_ids)} patients, trained on a {grid}³ grid, "
            f"scored as OpenKBP scores, on each patient's source grid (the checkpoints, and the ensemble's "
            f"members and weights, were chosen on these patients); latency: "
            f"median of {cfg.latency.runs} runs, batch 1, float32, {torch.get_num_threads()} CPU thread(s).")
    unlabeled, epochs = context["training_patients"]["unlabeled"], context["epochs"]
    if unlabeled:
        note += (f" The student also learned from {unlabeled} unlabeled patients, from the teacher alone "
                 f"({epochs['student']} epochs; the baseline {epochs['baseline']}).")
    write_text(out / "comparison.md", f"# nasdose distill: {out}\n\n{table}\n\n{note}\n")
    say(table)
    exported = None
    if cfg.export:
        exported = out / "student.pt2"
        export_student(load_model(out / "student")[0], grid, exported)
    student_row, baseline_row = rows[0], next((r for r in rows if r.name == BASELINE), None)
    metrics = {
        **context, "split": cfg.train.data.val_split, "patients": val_ids, "grid": grid,
        "latency": {"size": cfg.latency.size, "runs": cfg.latency.runs, "threads": torch.get_num_threads()},
        "rows": [asdict(r) for r in rows],
        "student_beats_baseline": None if baseline_row is None else {
            "dose_score": student_row.dose_score < baseline_row.dose_score,
            "dvh_score": student_row.dvh_score < baseline_row.dvh_score},
        "warnings": ["alpha_gt = 0: the student never saw the reference dose"] if cfg.alpha_gt == 0 else [],
        "export": str(exported) if exported is not None else None,
    }
    save_json(out / "metrics.json", metrics)
    if baseline_row is not None:
        verdict = "beats" if student_row.dose_score < baseline_row.dose_score else "does not beat"
        say(f"the distilled student {verdict} its architecture trained without distillation: validation dose "
            f"score {student_row.dose_score:.3f} vs {baseline_row.dose_score:.3f} Gy")
    say(f"wrote {out / 'comparison.md'}, {out / 'metrics.json'}, student: {out / 'student' / 'best.pt'}")
    return metrics


Config = DistillConfig


@dataclass(frozen=True)
class Inputs:
    teacher: Path  # an ensemble .yaml (or a run folder / checkpoint: one network)
    data: Path  # a nasdose data set
    teacher_cache: Path | None = None  # the teacher's predictions to reuse or write (default: OUT/teacher.h5)


def run(config: DistillConfig, inputs: Inputs, out: Path, resume: bool = False) -> dict[str, Any]:
    """Cache the teacher, train the student (and its baseline), compare, into `out`; returns the metrics."""
    with output_folder(out):
        return run_distill(inputs.teacher, inputs.data, Path(out), config, resume, inputs.teacher_cache)

