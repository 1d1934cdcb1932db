"""Distil an ensemble into one compact student network (LENAS's KDA-Net, done right).

  nasdose distill ENSEMBLE.yaml --student SPEC --data DATA.h5 --out DIR [--config CFG.yaml]
                  [--resume] [--baseline | --no-baseline] [--export] [--teacher-cache FILE]
                  [key=value ...]

ENSEMBLE.yaml is an ensemble written by `nasdose ensemble` (a training run folder or a
checkpoint works too: one network as the teacher). When the teacher is a cascade's
full-resolution stage (an ensemble trained with `train.cascade.coarse`, or one such run), so are
the student and its baseline: they refine the same coarse model, learn on source-grid patches
from the teacher's source-grid doses (the L1 terms; no hints, no adversary, no unlabeled
patients), and are scored as cascades. SPEC names the student's architecture:

  unet3d:widths=8,16,32       a registered model and its arguments (a list with commas; more
                              arguments with ':', e.g. unet3d:widths=8,16,32:norm=batch)
  student.yaml                a YAML file with a `model` section as in a training config
                              ({name: unet3d, kwargs: {widths: [8, 16, 32]}}), or a genotype
  genotype.yaml:width=0.5     a genotype with the stem and widths of its macro scaled by 0.5
  search:max_flops=3e9        the most accurate genotype a cost-aware search finds within the
                              limits (max_params, max_flops, max_latency_ms; optionally
                              :strategy=NAME:budget=N), searched on this data set into
                              DIR/student_search/ (`student_search`: nasdose search's keys;
                              nas_dose.distill.student_search), then trained as a genotype

The student minimizes  (alpha_gt + alpha_teacher) · L1(pred, blend), the blend being the
weighted mean of the dose and the teacher's prediction (combine=sum: alpha_gt · L1(pred, dose)
+ alpha_teacher · L1(pred, teacher)) [+ hint.weight · feature hints] [+ adversarial.weight · a
trained discriminator's term] (see nas_dose.distill.losses). alpha_gt=0 drops the reference
dose, only when asked for, with a warning. Patients of the data set's "unlabeled" split
(contours, no plan; `unlabeled.split`) are trained on beside the training split with the
teacher's term alone, the student's epochs cut so it takes as many steps as the baseline
(`unlabeled.same_steps`); `teacher_on: unlabeled` keeps the teacher to those and the labeled
patients to their reference dose. Hints (one member runs online for its features) and the adversarial
term (its discriminator trained by its own optimizer) are off by default; configs/distill.yaml
lists every key. Hints match the features of named modules (`hint.layers`, each pair with its
weight) or of every resolution level the student's and the teacher's U-Nets share
(`hint.levels: encoder_decoder`, nas_dose.distill.levels). Its training is `nasdose train`'s
(`train.*` keys: epochs, optim, data.augment, ...), with the teacher's prediction augmented like
the input; the checkpoint is chosen on the validation dose score against the reference dose.

`mode: concurrent` needs no trained teacher: ENSEMBLE.yaml (or a run) names the architectures
whose members are trained from scratch beside the student, in its steps, the student learning
from their current predictions and features (nas_dose.distill.concurrent); `concurrent.privileged`
gives the teacher the plans' preference values, or extra input channels of the data set (a beam
plate), that the student never sees. In either mode `train.data.hide` trains the student and its
baseline without extra channels of the data set that the teacher takes.
No teacher.h5 is made for training; DIR/teacher/ receives the trained members (an ensemble.yaml
for several), and the table scores them as the teacher.

DIR receives:
  teacher.h5        the teacher's predictions of the training, unlabeled and validation patients,
                    made once; reused by --resume and by later runs given it as --teacher-cache
                    (mode=concurrent: the trained members' predictions of the validation patients,
                    for the table; none with a teacher given preferences, which predicts from
                    inputs the validation patients do not have)
  student/          the student's training run: best.pt (`nasdose predict --model DIR/student`);
                    in concurrent mode its checkpoints also hold the teacher's members and optimizer
  teacher/          mode=concurrent: the members trained beside the student (last weights)
  baseline/         the same architecture, same initial weights and budget, trained without the
                    teacher (--no-baseline skips it)
  comparison.md     student, ensemble, best single member and baseline on validation dose and DVH
                    scores, parameters, FLOPs, latency, checkpoint size (also printed); a warning
                    when the teacher's dose score leads the baseline's by less than 3 %
  metrics.json      the same numbers, the training records and the settings; teacher_recomputed:
                    whether the run (at any of its starts) computed the teacher's predictions,
                    false when it reused a cache made before it (--teacher-cache)
  student.pt2       with --export: the student as a torch.export program (batch 1, data grid;
                    a conditioned student's takes the preferences as its second input), checked
                    against torch (`nasdose export` makes ONNX, dynamic sizes and model.yaml too)
  config.yaml       the resolved config

A teacher conditioned on planning preferences (an ensemble trained with `conditioning: film`, or
one conditioned run) teaches a student conditioned alike, with `train.data.plans: true`: the
teacher is cached once per plan of each training and validation patient, the student (and its
baseline) draws one plan per patient and epoch with its preferences, and the table scores every
model on each plan of the validation patients (on the data set's grid; costs at one preference
setting). No unlabeled patients then (they have no plan to ask for). Hints run the teacher's
member asked for the preferences of the plan the student is asked for; --export writes a program
of two inputs, the patient input and the preferences (nas_dose.export). A `search:` student is
then searched among networks conditioned alike, scored on every plan at its own preferences.

--resume continues an interrupted run: the cached teacher predictions and finished trainings
are reused and a half-trained one resumes from its last checkpoint.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from nas_dose import distributed
from nas_dose.cascade.objective import CascadeObjective
from nas_dose.config import ConfigError, at_least, check_run_folder, save_config
from nas_dose.data.dataset import PlanItem, extra_inputs, plan_items
from nas_dose.data.store import SPLITS, open_data
from nas_dose.errors import NasDoseError, input_error
from nas_dose.export import Config as ExportConfig
from nas_dose.export import export_model
from nas_dose.inference import (
    Cascade,
    Ensemble,
    as_predictor,
    conditioned_on,
    load_model_or_ensemble,
    load_predictor,
    trained_inputs,
)
from nas_dose.io import load_checkpoint, load_json, output_folder, save_json, write_text
from nas_dose.models.factory import ModelConfig, build_model, load_model
from nas_dose.models.spec import resolve_student, search_request
from nas_dose.parallel import run_side_by_side, worker_threads
from nas_dose.progress import say, warn
from nas_dose.runtime import Runtime, RuntimeConfig, seed_everything
from nas_dose.training import Objective, TrainConfig, train_model

from .concurrent import (
    TEACHER_DIR,
    ConcurrentConfig,
    ConcurrentObjective,
    privileged_score,
    save_teacher,
    teacher_members,
)
from .losses import (
    AdversarialConfig,
    CascadeDistillObjective,
    Combine,
    DistillObjective,
    HintConfig,
    TeacherOn,
    check_non_negative,
)
from .report import BASELINE, LatencyConfig, Mode, comparison_rows, comparison_table, idle_teacher
from .student_search import find_student
from .teacher import cache_is_current, ensure_cache, member_checkpoints, teacher_key


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
    `mode`: two_stage distils the given teacher's predictions; concurrent trains its members
    from scratch beside the student (`concurrent`, nas_dose.distill.concurrent).
    `parallel: 2` trains the student and the baseline at once, in two processes sharing
    `runtime.threads` (nas_dose.parallel); not under torchrun."""

    student: str | None = None
    # nasdose search's keys for a `search:` student, over student_search.DEFAULTS
    student_search: dict[str, Any] = field(default_factory=dict)
    mode: Literal["two_stage", "concurrent"] = "two_stage"
    concurrent: ConcurrentConfig = field(default_factory=ConcurrentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    alpha_gt: float = 1.0
    alpha_teacher: float = 1.0
    combine: Combine = "blend"
    # "unlabeled": the teacher's dose is the target of the unlabeled patients only; the labeled
    # learn from their reference dose alone (as pseudo-labels, not a blend with the reference)
    teacher_on: TeacherOn = "all"
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
        if self.train.prior.epochs:
            raise ConfigError("config key 'train.prior.epochs': nasdose train runs a dose prior, distillation does "
                              "not; leave it at 0")
        if self.train.consistency.weight:  # DistillObjective's loss has no such term
            raise ConfigError("config key 'train.consistency.weight': distillation's loss has its own terms, not the "
                              "objective-consistency one; leave it at 0")
        if self.concurrent.privileged and self.mode != "concurrent":
            raise ConfigError("config key 'concurrent.privileged': a privileged teacher trains beside the student; "
                              "set mode=concurrent")
        if self.unlabeled.split in (self.train.data.train_split, self.train.data.val_split):
            raise ConfigError(f"config key 'unlabeled.split': '{self.unlabeled.split}' is the training or "
                              "validation split; its patients have a plan")


# Keys that change what the student learns: a resumed run must keep them.
TRAINING_KEYS = ("student", "student_search", "mode", "concurrent", "train", "alpha_gt", "alpha_teacher",
                 "combine", "teacher_on", "unlabeled", "hint", "adversarial", "seed")


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


def _plan_items(teacher: Path, model: nn.Module, data: Path, ids: list[str],
                cfg: DistillConfig) -> list[PlanItem] | None:
    """A conditioned teacher's plans to cache (every plan of each patient); None for a plain one.
    Conditioning and `train.data.plans` go together."""
    if not conditioned_on(model):
        if cfg.train.data.plans:
            raise input_error(teacher, "is not conditioned on preferences: train.data.plans is for a conditioned "
                                       "teacher; leave it out")
        return None
    if not cfg.train.data.plans:
        raise input_error(teacher, "is conditioned on preferences, and teaches a conditioned student: "
                                   "set train.data.plans=true")
    with open_data(data) as d:
        return plan_items(d, ids)


def _conditioning_kind(teacher: Path) -> str:
    """The conditioning (e.g. film) of the teacher's (first member's) network."""
    return str(load_checkpoint(member_checkpoints(teacher)[0])["model_config"]["conditioning"]["kind"])


def _train(cfg: TrainConfig, data: Path, folder: Path, objective: Objective | None) -> dict[str, Any]:
    """Train (or resume, or reuse when finished) one run; its training metrics.json (written last,
    by the main rank: the other ranks take the main rank's view of it)."""
    record = folder / "metrics.json"
    if not distributed.on_main(record.exists):
        seed_everything(cfg.seed)
        cascade = cfg.cascade.coarse is not None
        if cascade and objective is None:  # the baseline of a cascade's stage
            objective = CascadeObjective(cfg, data)
        model = build_model(cfg.model, refiner=cascade, extra=extra_inputs(data, cfg.data.hide))
        train_model(model, cfg, data, folder, resume=True, objective=objective)
    return distributed.on_main(load_json, record)


def _train_student_and_baseline(cfg: DistillConfig, data: Path, out: Path, student_cfg: TrainConfig,
                                objective: Objective, baseline_cfg: TrainConfig) -> tuple[dict[str, Any], Any]:
    """The student's training record and the baseline's (None without one), side by side with
    `parallel: 2`."""
    jobs: list[tuple[TrainConfig, Path, Path, Objective | None]] = [(student_cfg, data, out / "student", objective)]
    if cfg.baseline:
        jobs.append((baseline_cfg, data, out / "baseline", None))
    workers = min(cfg.parallel, len(jobs))
    if workers > 1:
        threads = worker_threads(workers, cfg.runtime.threads)
        jobs = [(replace(c, runtime=replace(c.runtime, threads=threads)), d, o, obj) for c, d, o, obj in jobs]
        say(f"student and baseline side by side, {threads} thread(s) each")
    records = run_side_by_side(_train, jobs, workers)
    return records[0], (records[1] if cfg.baseline else None)


def run_concurrent(teacher: Path, data: Path, out: Path, cfg: DistillConfig, resume: bool, stage: Mode,
                   val_ids: list[str], labeled: int, unlabeled: int) -> dict[str, Any]:
    """`mode: concurrent`: the teacher's members trained from scratch beside the student (and the
    baseline), written to DIR/teacher, then the table."""
    if unlabeled:
        raise ConfigError(f"config key 'unlabeled.split': a teacher trained concurrently learns from plans alone; "
                          f"set unlabeled.split=null to leave out the {unlabeled} unlabeled patients of {data}")
    if cfg.student is not None and search_request(cfg.student) is not None:
        raise ConfigError("mode=concurrent: a student sized by a search (search:...) is for the two-stage mode; "
                          "name the student's SPEC")
    privileged, preferences = cfg.concurrent.privileged, cfg.concurrent.preferences
    hidden = cfg.concurrent.channels(data)
    if set(cfg.train.data.hide) - set(hidden):
        raise ConfigError("config key 'train.data.hide': in concurrent mode the teacher's members take every channel "
                          "of the data set and the student all but the privileged ones; name "
                          f"{', '.join(sorted(set(cfg.train.data.hide) - set(hidden)))} in concurrent.privileged "
                          "instead")
    members = teacher_members(teacher, cfg.concurrent, stage.extra)
    distributed.on_main(check_run_folder, out, cfg, resume, "a distillation run", out / "student", TRAINING_KEYS)
    student = distributed.on_main(resolve_student, cfg.student, out)
    save_config(out / "config.yaml", cfg)
    # the student and its baseline do not see the privileged channels; the teacher sees every one
    teacher_cfg = replace(cfg.train, model=student, seed=cfg.seed, runtime=cfg.runtime,
                          data=replace(cfg.train.data, hide=[]))
    train_cfg = replace(teacher_cfg, data=replace(cfg.train.data, hide=sorted({*cfg.train.data.hide, *hidden})))
    objective = ConcurrentObjective(members, preferences, cfg.seed, cfg.alpha_gt, cfg.alpha_teacher, cfg.hint,
                                    cfg.adversarial, cfg.combine)
    say(f"training {len(members)} member(s) of {teacher}'s architecture from scratch and distilling them, as they "
        f"learn, into {cfg.student}" + (f"; the teacher also sees {', '.join(privileged)}" if privileged else "")
        + (", and training the same architecture without distillation (baseline)" if cfg.baseline else ""))
    student_record, baseline_record = _train_student_and_baseline(cfg, data, out, train_cfg, objective, train_cfg)
    runtime = Runtime(cfg.runtime)
    trained = distributed.on_main(save_teacher, out / TEACHER_DIR, members, preferences, out / "student",
                                  teacher_cfg, stage.grid)
    context = {"mode": "concurrent", "teacher": str(trained), "architectures_of": str(teacher), "data": str(data),
               "student": cfg.student, "privileged": privileged,
               "training_patients": {"labeled": labeled, "unlabeled": 0},
               "epochs": {"student": train_cfg.epochs, "baseline": train_cfg.epochs},
               "student_training": student_record, "baseline_training": baseline_record}
    if preferences:
        # every rank scores its share of the validation plans (the means are all-reduced)
        context["teacher_val_dose_score"] = privileged_score(out / TEACHER_DIR, members, preferences, data, train_cfg,
                                                             runtime)
        return distributed.on_main(_report, trained, None, None, out, data, val_ids, stage, cfg, runtime, context)
    loaded = load_predictor(trained, runtime, stage.grid, extra=stage.extra)
    cache = out / "teacher.h5"
    ensure_cache(cache, teacher_key(trained, data), data, val_ids, lambda: loaded, runtime, stage.grid)
    return distributed.on_main(_report, trained, cast(nn.Module, loaded).cpu(), cache, out, data, val_ids, stage, cfg,
                               runtime, context)


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
        train_ids, val_ids, grid, extra = d.ids(split), d.ids(val_split), d.grid, extra_inputs(d)
        source = d.source_grid(val_ids[0]) if val_ids else grid
        unlabeled_ids = d.ids(cfg.unlabeled.split) if cfg.unlabeled.split is not None else []
    for name, ids in ((split, train_ids), (val_split, val_ids)):
        if not ids:
            raise input_error(data, f"no patients in split '{name}'")
    if cfg.teacher_on == "unlabeled" and cfg.mode == "concurrent":
        raise ConfigError("config key 'teacher_on': 'unlabeled' needs mode=two_stage")
    if unlabeled_ids and cfg.alpha_teacher == 0:
        raise ConfigError(f"alpha_teacher = 0: the {len(unlabeled_ids)} unlabeled patients of {data} would teach "
                          "nothing; set unlabeled.split=null to leave them out")
    if cfg.mode == "concurrent":
        if teacher_cache is not None:
            raise NasDoseError("--teacher-cache: a teacher trained concurrently has no predictions to reuse")
        return run_concurrent(teacher, data, out, cfg, resume, Mode(grid, source, extra=extra), val_ids,
                              len(train_ids), len(unlabeled_ids))
    runtime = Runtime(cfg.runtime)
    teacher_model = load_model_or_ensemble(teacher, grid, extra)
    loaded = as_predictor(teacher, teacher_model, runtime, grid)
    items = _plan_items(teacher, teacher_model, data, train_ids + val_ids, cfg)
    if items is not None:
        unlabeled_ids = []  # no plan to ask the teacher for
    stage = Mode(grid, source, loaded if isinstance(loaded, Cascade) else None,
                 None if items is None else tuple(i for i in items if i.pid in val_ids), extra)
    if stage.cascade is not None:
        if cfg.hint.weight or cfg.adversarial.weight:
            raise ConfigError("a cascade's stage is distilled with the L1 terms only: set hint.weight=0 and "
                              "adversarial.weight=0")
        unlabeled_ids = []  # a stage learns on patches of patients with a plan
    if cfg.teacher_on == "unlabeled" and not unlabeled_ids:
        raise ConfigError("config key 'teacher_on': 'unlabeled' needs unlabeled patients (unlabeled.split; none "
                          "for a cascade's stage or a preference teacher); without them the teacher teaches nothing")
    # the network(s) the teacher runs: a cascade's full-resolution stage, or the ensemble itself
    predictor: nn.Module = loaded.refiner if isinstance(loaded, Cascade) else cast(nn.Module, loaded)
    # Under torchrun the student and the baseline train data-parallel, the ranks predict the
    # teacher's patients between them; the steps that check or write files (and report) run on
    # the main rank alone.
    distributed.on_main(check_run_folder, out, cfg, resume, "a distillation run", out / "student", TRAINING_KEYS)
    # before a student's search, so that an interrupted one is resumed under the same keys, or replaced by --force
    save_config(out / "config.yaml", cfg)
    request, searched = search_request(cfg.student), None
    spec = cfg.student
    # taught across the teacher's preferences, the student is conditioned as the teacher is
    conditioning = _conditioning_kind(teacher) if items is not None else None
    if request is not None:
        if stage.cascade is not None:
            raise ConfigError("a student sized by a search is not available for a cascade's stage; name its SPEC")
        path, searched = find_student(request, cfg.student_search, cfg.seed, cfg.runtime, (split, val_split), data,
                                      out, resume, conditioning)
        spec = str(path)
    student = distributed.on_main(resolve_student, spec, out)
    if conditioning is not None:
        student = replace(student, conditioning=conditioning)
    key = teacher_key(teacher, data)
    cache = Path(teacher_cache) if teacher_cache is not None else out / "teacher.h5"
    ids = train_ids + unlabeled_ids + val_ids if items is None else [i.key for i in items]
    recomputed = distributed.on_main(_check_teacher, out, teacher, data, key, cache, ids, stage.cache_grid)
    ensure_cache(cache, key, data, ids, lambda: loaded, runtime, stage.cache_grid, items)
    train_cfg = replace(cfg.train, model=student, seed=cfg.seed, runtime=cfg.runtime)
    if stage.cascade is not None:  # the student refines the teacher's coarse stage, as the teacher does
        train_cfg = replace(train_cfg, cascade=stage.cascade.config)
    student_cfg = replace(train_cfg, epochs=student_epochs(cfg, len(train_ids), len(unlabeled_ids)))
    objective: DistillObjective
    if stage.cascade is not None:
        objective = CascadeDistillObjective(cache, CascadeObjective(student_cfg, data), cfg.alpha_gt,
                                            cfg.alpha_teacher, combine=cfg.combine)
    else:
        hint_teacher = _hint_member(predictor, cfg.hint) if cfg.hint.weight > 0 else None
        objective = DistillObjective(cache, cfg.alpha_gt, cfg.alpha_teacher, cfg.hint, cfg.adversarial,
                                     hint_teacher=hint_teacher, combine=cfg.combine,
                                     unlabeled_split=cfg.unlabeled.split if unlabeled_ids else None,
                                     teacher_on=cfg.teacher_on)
    say(f"distilling {teacher} into {cfg.student}"
        + (f", with {len(unlabeled_ids)} unlabeled patients taught by the teacher alone "
           f"({student_cfg.epochs} epochs)" if unlabeled_ids else "")
        + (", and training the same architecture without distillation (baseline)" if cfg.baseline else ""))
    student_record, baseline_record = _train_student_and_baseline(cfg, data, out, student_cfg, objective, train_cfg)
    context = {"teacher": str(teacher), "data": str(data), "student": cfg.student, "student_search": searched,
               "teacher_key": key,
               "teacher_cache": str(cache), "teacher_recomputed": recomputed,
               "training_patients": {"labeled": len(train_ids), "unlabeled": len(unlabeled_ids)},
               "epochs": {"student": student_cfg.epochs, "baseline": train_cfg.epochs},
               "student_training": student_record, "baseline_training": baseline_record}
    return distributed.on_main(_report, teacher, predictor.cpu(), cache, out, data, val_ids, stage, cfg, runtime,
                               context)


def _report(teacher: Path, predictor: nn.Module | None, cache: Path | None, out: Path, data: Path, val_ids: list[str],
            stage: Mode, cfg: DistillConfig, runtime: Runtime, context: dict[str, Any]) -> dict[str, Any]:
    """The table (printed, comparison.md), metrics.json and the export."""
    rows = comparison_rows(teacher, predictor, cache, out, data, val_ids, stage, cfg.latency, runtime, cfg.baseline)
    table = comparison_table(rows, stage.size, cfg.latency.size)
    grid = stage.grid
    note = (f"Validation split '{cfg.train.data.val_split}', {len(val_ids)} patients, trained on a {grid}³ grid, "
            f"scored as OpenKBP scores, on each patient's source grid (the checkpoints, and the ensemble's "
            f"members and weights, were chosen on these patients); latency: "
            f"median of {cfg.latency.runs} runs, batch 1, float32, {torch.get_num_threads()} CPU thread(s).")
    if stage.cascade is not None:
        note += (f" The networks are the full-resolution stage of a cascade refining {stage.cascade.config.coarse}: "
                 f"trained on {stage.size}³ source-grid patches, their FLOPs and latency per window.")
    if stage.items is not None:
        note += (f" The teacher is conditioned on preferences: every model is asked for each of the {len(stage.items)} "
                 f"validation plans' preferences and scored against that plan, on the {grid}³ grid.")
    unlabeled, epochs = context["training_patients"]["unlabeled"], context["epochs"]
    if cfg.mode == "concurrent":
        note += (f" The teacher ({context['architectures_of']}'s architectures) was trained from scratch beside the "
                 "student, which learned from its current predictions; its last weights are in "
                 f"{context['teacher']}.")
    student_inputs = trained_inputs(out / "student")
    hidden = [n for n in stage.extra if n not in student_inputs]
    if hidden:
        note += f" The teacher also saw {', '.join(hidden)}; the student and its baseline did not (train.data.hide)."
    if predictor is None:
        note += (f" The teacher also saw {', '.join(cfg.concurrent.preferences)} (privileged: the rows cannot "
                 f"run it); its validation dose score given each plan's preferences, on the {grid}³ grid: "
                 f"{context['teacher_val_dose_score']:.3f} Gy.")
    if unlabeled:
        note += (f" The student also learned from {unlabeled} unlabeled patients, from the teacher alone "
                 f"({epochs['student']} epochs; the baseline {epochs['baseline']}).")
    idle = idle_teacher(rows)
    if idle:
        note += f" Warning: {idle}."
    write_text(out / "comparison.md", f"# nasdose distill: {out}\n\n{table}\n\n{note}\n")
    say(table)
    exported = None
    if cfg.export:
        exported = out / "student.pt2"
        export_model(load_model(out / "student")[0], exported, ExportConfig(format="pt2", dynamic=False), stage.size,
                     student_inputs)
    student_row, baseline_row = rows[0], next((r for r in rows if r.name == BASELINE), None)
    warnings = (["alpha_gt = 0: the student never saw the reference dose"] if cfg.alpha_gt == 0 else []) + (
        [idle] if idle else [])
    metrics = {
        **context, "split": cfg.train.data.val_split, "patients": val_ids, "grid": grid,
        "latency": {"size": cfg.latency.size, "runs": cfg.latency.runs, "threads": torch.get_num_threads()},
        "rows": [asdict(r) for r in rows],
        "student_beats_baseline": None if baseline_row is None else {
            "dose_score": student_row.dose_score < baseline_row.dose_score,
            "dvh_score": student_row.dvh_score < baseline_row.dvh_score},
        "warnings": warnings,
        "export": str(exported) if exported is not None else None,
    }
    save_json(out / "metrics.json", metrics)
    if baseline_row is not None:
        verdict = "beats" if student_row.dose_score < baseline_row.dose_score else "does not beat"
        say(f"the distilled student {verdict} its architecture trained without distillation: validation dose "
            f"score {student_row.dose_score:.3f} vs {baseline_row.dose_score:.3f} Gy")
    if idle:
        warn(idle)
    say(f"wrote {out / 'comparison.md'}, {out / 'metrics.json'}, student: {out / 'student' / 'best.pt'}")
    return metrics


Config = DistillConfig


@dataclass(frozen=True)
class Inputs:
    teacher: Path  # an ensemble .yaml (or a run folder / checkpoint: one network)
    data: Path  # a nasdose data set
    teacher_cache: Path | None = None  # the teacher's predictions to reuse or write (default: OUT/teacher.h5)


def run(config: DistillConfig, inputs: Inputs, out: Path, resume: bool = False, *,
        force: bool = False) -> dict[str, Any]:
    """Cache the teacher, train the student (and its baseline), compare, into `out`; returns the metrics.
    `force`: an earlier run in `out` is removed first."""
    with output_folder(out, replace=force):
        return run_distill(inputs.teacher, inputs.data, Path(out), config, resume, inputs.teacher_cache)

