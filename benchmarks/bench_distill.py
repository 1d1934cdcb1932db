"""What distillation costs: a distillation step with the cached teacher ÷ a plain training step of
the same student (target ≤ 1.3: the cached teacher adds one array to read and augment per item,
not the ensemble's forward passes), and the inference latency of the ensemble ÷ the student's.

Both training variants run through the training engine as `nasdose distill` and `nasdose train`
run them (`train_model`, one with the distillation objective; HDF5 reads, augmentation and the
copy to the device included). A step's time is the interval between consecutive `on_step` calls;
the first step and the last (which holds the epoch-end validation) are left out. The variants
alternate in rounds, the order rotated each round; the ratio is the median of per-round ratios.

The teacher is an ensemble of three all-conv LENAS networks at the workload's width (untrained:
speed does not depend on the weights); the student is the same genotype at width 0.5 (about a
quarter of a member's parameters).

    python benchmarks/bench_distill.py --quick

`--ablation SEEDS` runs, instead, a tiny quality ablation of the distillation modes at equal total
compute (`run_ablation`): a 16³ grid, two LENAS members, a student at width 0.5, minutes on one
thread; `--ablation SEEDS --plans` the same on preference plans, with a privileged teacher or not.
"""
from __future__ import annotations

import copy
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nas_dose.config import load_config
from nas_dose.data.dataset import IN_CHANNELS, DoseDataset, PlanDataset, make_loader
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.distill.concurrent import ConcurrentObjective, Member, widened
from nas_dose.distill.losses import DistillObjective, HintConfig
from nas_dose.distill.teacher import ensure_cache
from nas_dose.inference import Ensemble
from nas_dose.models.factory import ModelConfig, build_model, model_spec
from nas_dose.models.spec import scale_genotype
from nas_dose.progress import is_quiet, set_quiet
from nas_dose.runtime import Runtime, resolve_device, seed_everything
from nas_dose.search_spaces import count_flops, count_params, save_genotype
from nas_dose.training import Objective, TrainConfig, train_model, validate

from common import (
    Row,
    Timing,
    Workload,
    genotype_network,
    lenas_conv_genotype,
    main,
    mean_sd,
    result,
    si,
    speedup,
    synchronize,
    time_cases,
    torch_state_restored,
    workload,
)

TARGET = 1.3
MEMBERS = 3


def step_seconds(cfg: TrainConfig, data: Path, device: torch.device, cache: Path | None) -> float:
    """Median seconds of the steps of one short run (distillation when `cache` is given)."""
    stamps: list[float] = []

    def stamp(step: int) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    seed_everything(cfg.seed)
    objective = DistillObjective(cache) if cache is not None else None
    train_model(build_model(cfg.model), cfg, data, on_step=stamp, objective=objective)
    return statistics.median([b - a for a, b in itertools.pairwise(stamps)][:-1])


def inference(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            model(x)

    return call


def run(quick: bool, device: str = "auto", w: Workload | None = None, ablation: int = 0,
        plans: bool = False) -> dict[str, Any]:
    dev = resolve_device(device)
    if ablation:
        return run_ablation(ablation, dev, plans)
    w = w or workload(quick, dev)
    steps = 4 if quick else 8
    with tempfile.TemporaryDirectory() as tmp, torch_state_restored():
        folder = Path(tmp)
        data, cache = folder / "synth.h5", folder / "teacher.h5"
        save_genotype(folder / "student.yaml", scale_genotype(lenas_conv_genotype(w), 0.5))
        cfg = load_config(TrainConfig, overrides=[
            "model.name=lenas", f"model.genotype={folder / 'student.yaml'}", "epochs=1",
            f"steps_per_epoch={steps + 2}", "log_every=1000000", f"data.batch_size={w.batch}",
            f"runtime.device={dev}"])
        runtime = Runtime(cfg.runtime)
        ensemble = Ensemble([genotype_network(w, seed=i) for i in range(MEMBERS)], [1 / MEMBERS] * MEMBERS).eval()
        quiet = is_quiet()
        set_quiet(True)  # no progress bars in the middle of the suite's output
        try:
            write_dataset(data, synth_patients(8, w.grid, seed=0), source="synth", grid=w.grid)
            with open_data(data) as d:
                ids = d.ids("train") + d.ids("validation")
            ensure_cache(cache, "bench", data, ids, lambda: runtime.prepare(ensemble).eval(), runtime, w.grid)
            rounds: dict[str, list[float]] = {"plain": [], "distill": []}
            for r in range(w.repeats):
                for name in ("plain", "distill") if r % 2 == 0 else ("distill", "plain"):
                    rounds[name].append(step_seconds(cfg, data, dev, cache if name == "distill" else None))
        finally:
            set_quiet(quiet)
        student = build_model(cfg.model).to(dev).eval()
        x = torch.zeros(1, IN_CHANNELS, w.grid, w.grid, w.grid, device=dev)
        latency, failed = time_cases({"ensemble": inference(ensemble.to(dev), x), "student": inference(student, x)},
                                     dev, w.warmup, w.repeats)
    plain, distill = (Timing(rounds[k], rounds[k][0]) for k in ("plain", "distill"))
    rows = [Row("distillation step (cached teacher) ÷ plain step, same student", speedup(plain, distill),
                high=TARGET, detail=f"{distill.median_s * 1e3:.3g} vs {plain.median_s * 1e3:.3g} ms per step")]
    if "ensemble" in latency and "student" in latency:
        ens, stu = latency["ensemble"], latency["student"]
        rows.append(Row(f"inference latency ensemble ({MEMBERS} members) ÷ student", speedup(stu, ens),
                        detail=f"{ens.median_s * 1e3:.3g} vs {stu.median_s * 1e3:.3g} ms at {w.grid}³, batch 1"))
    rows += [Row(f"inference latency ({name})", skipped=why) for name, why in failed.items()]
    params = {"ensemble": count_params(ensemble), "student": count_params(student)}
    notes = [(f"{steps} timed steps per run, {w.repeats} rounds, batch {w.batch} at {w.grid}³, augmentation on, "
              "loading in the training process (data.num_workers=0)"),
             (f"parameters: ensemble {si(params['ensemble'], '')}, student {si(params['student'], '')} "
              f"({params['student'] * MEMBERS / params['ensemble']:.2f} of one member)")]
    return result("distill", dev, rows, w=w, runtime=runtime, notes=notes, measurements={
        "step_seconds": rounds, "latency": {k: t.to_dict() for k, t in latency.items()}, "params": params})


# ---------------------------------------------------------------------------------------------
# The ablation: what each mode buys at equal total compute.

ABLATION = Workload(grid=16, batch=2, stem=4, widths=(8, 16), warmup=0, repeats=1)
ABLATION_STEPS = 120  # each pretrained member's steps and the two-stage student's (and the baseline's)
ABLATION_EPOCHS = 6  # validations per run (the checkpoint is the best of them)
HINTS = HintConfig(weight=0.5, levels="encoder_decoder")


def train_compute(flops: float, steps: int, batch: int) -> float:
    """FLOPs of `steps` training steps of a network of `flops` per sample: forward + backward (2×)."""
    return 3 * flops * steps * batch


def equal_compute_steps(member_flops: float, student_flops: float, members: int, patients: int,
                        hints: bool) -> tuple[int, float]:
    """Concurrent steps that cost the two-stage run's compute, and that compute: two-stage spends
    members × ABLATION_STEPS training steps of a member, one forward of each member per patient
    (the cache), ABLATION_STEPS student steps and, with hints, one member forward per sample of
    those steps; a concurrent step trains every member and the student once (hint features come
    free from the members' own forward). Baselines and validation are outside both budgets."""
    batch = ABLATION.batch
    total = (members * train_compute(member_flops, ABLATION_STEPS, batch) + members * member_flops * patients
             + train_compute(student_flops, ABLATION_STEPS, batch)
             + (member_flops * ABLATION_STEPS * batch if hints else 0.0))
    per_step = members * train_compute(member_flops, 1, batch) + train_compute(student_flops, 1, batch)
    return round(total / per_step), total


def ablation_config(genotype: Path, steps: int, seed: int, dev: torch.device, plans: bool = False) -> TrainConfig:
    return load_config(TrainConfig, overrides=[
        "model.name=lenas", f"model.genotype={genotype}", f"epochs={ABLATION_EPOCHS}",
        f"steps_per_epoch={max(1, round(steps / ABLATION_EPOCHS))}", "optim.lr=0.003", "log_every=1000000",
        f"data.batch_size={ABLATION.batch}", f"seed={seed}", f"runtime.device={dev}", "runtime.threads=1",
        f"data.plans={str(plans).lower()}"])


def val_score(cfg: TrainConfig, data: Path, objective: Objective | None = None) -> float:
    """The validation dose score (Gy, the data set's grid) of the run's checkpoint."""
    seed_everything(cfg.seed)
    return train_model(build_model(cfg.model), cfg, data, objective=objective).best_val_score


def run_ablation(seeds: int, dev: torch.device, plans: bool = False) -> dict[str, Any]:
    """Per seed: the student alone (baseline), two-stage (members pretrained, cached, then the
    student; with and without multi-level hints) and concurrent (members and student together,
    as many steps as cost the same compute), all scored on validation; ratios are student ÷
    baseline, averaged over the seeds (< 1: the mode helps). With `plans`, instead, on phantoms
    with 3 preference plans each (every network trained on one drawn plan per patient and epoch,
    validated on every plan): the student alone, and concurrent with hints from a teacher that
    does or does not also see the drawn plan's preferences (privileged)."""
    if plans:
        return plan_ablation(seeds, dev)
    w = ABLATION
    members = 2
    scores: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, torch_state_restored():
        folder = Path(tmp)
        data = folder / "synth.h5"
        member_file, student_file = ablation_genotypes(folder, w)
        flops = {name: count_flops(build_model(ModelConfig(name="lenas", genotype=str(f))), (1, IN_CHANNELS,
                                                                                             *(w.grid,) * 3))
                 for name, f in (("member", member_file), ("student", student_file))}
        quiet = is_quiet()
        set_quiet(True)
        try:
            write_dataset(data, synth_patients(16, w.grid, seed=0), source="synth", grid=w.grid)
            with open_data(data) as d:
                ids = d.ids("train") + d.ids("validation")
            steps = {hints: equal_compute_steps(flops["member"], flops["student"], members, len(ids), hints)
                     for hints in (False, True)}
            runtime = Runtime(ablation_config(student_file, 1, 0, dev).runtime)
            for seed in range(seeds):
                def add(name: str, value: float) -> None:
                    scores.setdefault(name, []).append(value)

                student_cfg = ablation_config(student_file, ABLATION_STEPS, seed, dev)
                add("baseline", val_score(student_cfg, data))
                nets = []
                for m in range(members):
                    cfg = ablation_config(member_file, ABLATION_STEPS, 100 * seed + m + 1, dev)
                    seed_everything(cfg.seed)
                    nets.append(build_model(cfg.model))
                    train_model(nets[-1], cfg, data)
                ensemble = runtime.prepare(Ensemble(nets, [1 / members] * members)).eval()
                add("two-stage teacher", validate(ensemble, val_loader(data), runtime)[0])
                cache = folder / f"teacher{seed}.h5"
                ensure_cache(cache, f"seed{seed}", data, ids, lambda: ensemble, runtime, w.grid)
                add("two-stage", val_score(student_cfg, data, DistillObjective(cache)))
                add("two-stage + hints", val_score(student_cfg, data, DistillObjective(
                    cache, hint=HINTS, hint_teacher=ensemble.members[0])))
                spec = model_spec(ModelConfig(name="lenas", genotype=str(member_file)))
                for hints in (False, True):
                    objective = ConcurrentObjective([Member(f"m{m}", 1 / members, spec) for m in range(members)], [],
                                                    seed, hint=HINTS if hints else None)
                    add("concurrent" + (" + hints" if hints else ""),
                        val_score(ablation_config(student_file, steps[hints][0], seed, dev), data, objective))
                    if not hints:
                        teacher = Ensemble(list(objective.nets), [1 / members] * members).eval()
                        add("concurrent teacher", validate(teacher, val_loader(data), runtime)[0])
        finally:
            set_quiet(quiet)
    notes = [f"{seeds} seeds; {w.grid}³ grid, batch {w.batch}, 16 phantoms; members: all-conv LENAS stem "
             f"{w.stem}, widths {list(w.widths)} ({si(flops['member'], 'FLOP')}); student at width 0.5 "
             f"({si(flops['student'], 'FLOP')}); two-stage: {members} members × {ABLATION_STEPS} steps, "
             f"then {ABLATION_STEPS} student steps; concurrent at equal compute: {steps[False][0]} steps "
             f"({steps[True][0]} against two-stage + hints); hints: {HINTS.levels}, weight {HINTS.weight}",
             "compute = 3 × forward FLOPs per training sample (forward + backward), 1 × per forward-only "
             "sample (the cache, the online hint member); validation and the baseline are outside the budgets"]
    return result("distill", dev, score_rows(scores), w=w, notes=notes, measurements={
        "val_dose_score": scores, "flops": flops, "concurrent_steps": {"plain": steps[False][0],
                                                                        "hints": steps[True][0]},
        "compute_flops": {"plain": steps[False][1], "hints": steps[True][1]}})


def score_rows(scores: dict[str, list[float]]) -> list[Row]:
    """Each variant's mean per-seed score ÷ the baseline's (the student alone)."""
    base = scores["baseline"]
    rows = []
    for name, values in scores.items():
        if name == "baseline":
            continue
        ratios = [v / b for v, b in zip(values, base)]
        mean, sd = mean_sd(values)
        rows.append(Row(f"validation dose score: {name} ÷ student alone", statistics.mean(ratios),
                        detail=f"{mean:.3f} ± {sd:.3f} vs {statistics.mean(base):.3f} Gy; per seed "
                               + ", ".join(f"{r:.3f}" for r in ratios)))
    return rows


def ablation_genotypes(folder: Path, w: Workload) -> tuple[Path, Path]:
    """The ablations' member (the all-conv LENAS genotype) and student (it at half width), saved."""
    member_file, student_file = folder / "member.yaml", folder / "student.yaml"
    save_genotype(member_file, lenas_conv_genotype(w))
    save_genotype(student_file, scale_genotype(lenas_conv_genotype(w), 0.5))
    return member_file, student_file


def plan_ablation(seeds: int, dev: torch.device) -> dict[str, Any]:
    """`run_ablation` on preference plans: does a privileged teacher teach more? (see there)"""
    w, members, privileged = ABLATION, 2, ["oar", "hi"]
    scores: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, torch_state_restored():
        folder = Path(tmp)
        data = folder / "plans.h5"
        member_file, student_file = ablation_genotypes(folder, w)
        spec = model_spec(ModelConfig(name="lenas", genotype=str(member_file)))
        quiet = is_quiet()
        set_quiet(True)
        try:
            write_dataset(data, synth_patients(16, w.grid, seed=0, preferences=3), source="synth", grid=w.grid)
            runtime = Runtime(ablation_config(student_file, 1, 0, dev).runtime)
            for seed in range(seeds):
                cfg = ablation_config(student_file, ABLATION_STEPS, seed, dev, plans=True)
                scores.setdefault("baseline", []).append(val_score(cfg, data))
                for extra in ([], privileged):
                    team = [Member(f"m{m}", 1 / members, widened(copy.deepcopy(spec), (), extra))
                            for m in range(members)]
                    objective = ConcurrentObjective(team, extra, seed, hint=HINTS)
                    name = "concurrent + hints" + (", privileged teacher" if extra else "")
                    scores.setdefault(name, []).append(val_score(cfg, data, objective))
                    teacher = Ensemble(list(objective.nets), [1 / members] * members).eval()
                    loader = make_loader(PlanDataset(data, "validation", every_plan=True, preferences=bool(extra)),
                                         w.batch, shuffle=False)
                    scores.setdefault("privileged teacher" if extra else "plain teacher", []).append(
                        validate(teacher, loader, runtime)[0])
        finally:
            set_quiet(quiet)
    notes = [f"{seeds} seeds; {w.grid}³ grid, batch {w.batch}, 16 phantoms with 3 preference plans each; members: "
             f"all-conv LENAS stem {w.stem}, widths {list(w.widths)}, student at width 0.5, all {ABLATION_STEPS} "
             f"steps; the privileged members also see the plan's {', '.join(privileged)} as constant channels; "
             f"hints: {HINTS.levels}, weight {HINTS.weight}; scores on every validation plan (the student and "
             "the plain teacher predict one dose for all of a patient's plans)"]
    return result("distill", dev, score_rows(scores), w=w, notes=notes, measurements={"val_dose_score": scores})


def val_loader(data: Path) -> Any:
    return make_loader(DoseDataset(data, "validation"), ABLATION.batch, shuffle=False)


def add_options(parser: Any) -> None:
    parser.add_argument("--ablation", type=int, default=0, metavar="SEEDS",
                        help="run the tiny quality ablation of the modes over SEEDS seeds instead")
    parser.add_argument("--plans", action="store_true",
                        help="with --ablation: on preference plans, with and without a privileged teacher")


if __name__ == "__main__":
    main("distill", run, __doc__.split("\n\n")[0], add=add_options,
         options=lambda a: {"ablation": a.ablation, "plans": a.plans})
