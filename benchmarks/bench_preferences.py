"""Does conditioning on planning preferences predict the plan a planner asks for?

    python benchmarks/bench_preferences.py [--quick] [--seeds 0 1] [--grid 32] [--epochs N] [--steps N]
        [--consistency W] [--distil] [--student-widths 4 8 16] [--openkbp DATA.h5] [--out FILE.json]

Per seed, on synthetic phantoms with preference plans (`nasdose data synth --preferences K`,
made in a temporary folder):

1. two models of the same architecture (the reference U-Net, `--widths`) are trained with the
   same budget, seed and data (`data.plans`: one of each patient's plans drawn per epoch), one
   conditioned on the plan's preferences (`model.conditioning: film`), one not (it can only learn
   the mean plan of an anatomy);
   With `--beam-plates` every model (and the held-out phantoms) also has each phantom's beam
   arrangement as an input channel (`nasdose data synth --beam-plates`);
2. on held-out phantoms (another data seed: nothing was trained or chosen on them), each with
   `--plans` ground-truth plans at their own preferences:
   - dose score (mean absolute error in the possible-dose mask, Gy) of each model's prediction
     against every plan, the conditioned model asked for that plan's preferences; the
     improvement is 1 - conditioned / plain (the issue's target: >= 20 %);
   - monotonicity: the conditioned model predicts each patient at `--sweep` values of `oar`
     (`hi` at the median of the patient's plans); for each spared OAR in the dose grid, Spearman
     ρ between the slider and minus its mean dose (1: the dose falls at every step), averaged
     per patient, then over patients (target >= 0.95); the same for the PTV70 HI against `hi`;
   with `--consistency W` (> 0), a third model, conditioned and trained with the same budget plus
   the objective-consistency term at weight W (`train.consistency`, nas_dose/training/losses.py;
   `min_voxels` 1, as a 16³ phantom's PTV70 and OARs are a few voxels), is scored the same way;
   its improvement is against the same plain model, and its change against the conditioned one;
   with `--distil`, the model with the term (the conditioned one without `--consistency`) teaches
   a conditioned student of `--student-widths` by `nasdose distill` (two-stage, each plan's
   teacher dose at its preferences, the same budget), and the student's twin trains alone
   (`baseline`); both are scored the same way: the accuracy of the network the latency target
   below is for;
   the floor: the dose score of each held-out patient's per-voxel median plan against its plans,
   the least error any one dose per patient can have, so the least a plain model can reach;
   the fit: the plain model's dose score on `--fit-patients` of its own training phantoms, which
   tells a model that does not generalise (far below the held-out score) from one that cannot
   fit its data (close to it);
3. latency of one forward pass (batch 1, inference mode, this CPU, `--threads`) at 32³ and 128³
   of the conditioned network and the plain one, and of a conditioned student (the reference
   U-Net at `--student-widths`; by default the pipeline's student, configs/pipeline.yaml), the
   network the issue's ≤ 50 ms at 32³ is for: the cheap model the viewer runs;
4. with `--openkbp DATA.h5` (a resampled data set, e.g. `nasdose data import` of OpenKBP at
   `--grid 32`; read only), per seed a plain and a conditioned model trained alike on it with
   `nasdose train` (`data.plans`: each patient one plan, its dose, at its measured preferences),
   and their official validation scores on the source grid as `nasdose train` reports them: the
   conditioned model's at each patient's own measured preferences (`nasdose predict --preference
   measured`). The issue's target: conditioned ÷ plain ≤ 1 ("no worse"). Those measured
   preferences come from the reference dose, so the conditioned model is told a little of the
   answer: a fair comparison, not a use case.

The table gives the mean over seeds (± sample sd in the detail). Not in the suite (minutes).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from scipy import stats

from nas_dose.data import synth
from nas_dose.data.augment import AugmentConfig
from nas_dose.data.dataset import IN_CHANNELS, extra_inputs
from nas_dose.data.patient import OARS, TARGETS, Patient, Plans
from nas_dose.data.preferences import homogeneity_index
from nas_dose.data.store import DataFile, open_data
from nas_dose.distill.distill import DistillConfig
from nas_dose.distill.distill import Inputs as DistillInputs
from nas_dose.distill.distill import run as nasdose_distill
from nas_dose.distill.report import LatencyConfig
from nas_dose.errors import NasDoseError
from nas_dose.inference import Predictor, load_model_or_ensemble, predict_patient
from nas_dose.io import load_json
from nas_dose.models.conditioning import Conditioned, Preset
from nas_dose.models.factory import ModelConfig, build_model
from nas_dose.progress import set_quiet
from nas_dose.runtime import Runtime, RuntimeConfig, resolve_device, seed_everything
from nas_dose.scores import dose_error
from nas_dose.train import Inputs
from nas_dose.train import run as nasdose_train
from nas_dose.training import ConsistencyConfig, DataConfig, OptimConfig, TrainConfig, train_model

from common import Row, add_settings_arguments, mean_sd, result, settings_option, time_cases
from common import main as bench_main

SPARED = tuple(o for o in OARS if o != "Mandible")  # the OARs the beam model spares


@dataclass
class HeldOutPlans:
    """What every preference benchmark trains on and scores with (`make_data`, `evaluate`)."""

    patients: int = 20  # training data set: train and validation splits
    held_out: int = 6  # held-out phantoms, another data seed
    plans: int = 6  # preference plans per phantom
    grid: int = 32
    seeds: list[int] = field(default_factory=lambda: [0])
    data_seed: int = 0
    held_out_seed: int = 1000
    sweep: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    hi_sweep: list[float] = field(default_factory=lambda: [0.1, 0.15, 0.2, 0.25, 0.3])
    beam_plates: bool = False  # every model also sees each phantom's beam arrangement (`--beam-plates`)
    threads: int | None = 1


@dataclass
class Settings(HeldOutPlans):
    """What one measurement runs; the defaults fit about a quarter of an hour per seed on one CPU thread."""

    widths: list[int] = field(default_factory=lambda: [8, 16, 32])
    epochs: int = 20
    steps: int = 30  # per epoch
    batch: int = 2
    lr: float = 3e-3
    latency_grids: list[int] = field(default_factory=lambda: [32, 128])
    latency_repeats: int = 20  # at the first grid; a tenth of it (at least 2) at the others
    student_widths: list[int] = field(default_factory=lambda: [8, 16, 32])  # the pipeline's student
    consistency: float = 0.0  # > 0: also a conditioned model trained with the consistency term at this weight
    distil: bool = False  # also a conditioned student of `student_widths` distilled from it, and its twin
    openkbp: str = ""  # a resampled data set: also compare plain and conditioned on it, officially
    fit_patients: int = 12  # training phantoms the plain model is also scored on (`fit_score`)

    def quick(self) -> Settings:
        """Seconds: a few 16³ phantoms, a tiny network, a few steps, one seed."""
        return replace(self, patients=4, held_out=2, plans=5, grid=16, widths=[4, 8], epochs=1, steps=3,
                       latency_grids=[16], latency_repeats=2, student_widths=[2, 4])


def make_data(s: HeldOutPlans, folder: Path) -> tuple[Path, Path]:
    """The training data set and the held-out one, with their preference plans."""
    train, held = folder / "train.h5", folder / "held_out.h5"
    for path, n, seed in ((train, s.patients, s.data_seed), (held, max(s.held_out, 2), s.held_out_seed)):
        synth.run(synth.Config(patients=n, grid=s.grid, seed=seed, preferences=s.plans, beam_plates=s.beam_plates),
                  synth.Inputs(), path)
    return train, held


def train_config(s: Settings, seed: int, conditioned: bool, device: str, consistency: float = 0.0) -> TrainConfig:
    """The budget every model gets: one plan per patient per step (`data.plans`), no augmentation."""
    model_cfg = ModelConfig(kwargs={"widths": list(s.widths)}, conditioning="film" if conditioned else None)
    return TrainConfig(model=model_cfg,
                       data=DataConfig(batch_size=s.batch, augment=AugmentConfig(enabled=False), plans=True),
                       optim=OptimConfig(lr=s.lr), epochs=s.epochs, steps_per_epoch=s.steps, seed=seed,
                       runtime=RuntimeConfig(device=device, threads=s.threads),
                       consistency=ConsistencyConfig(weight=consistency, min_voxels=1))


def train(s: Settings, data: Path, seed: int, conditioned: bool, device: str,
          consistency: float = 0.0, folder: Path | None = None) -> torch.nn.Module:
    """The model chosen on validation after the fixed budget, in eval mode (a conditioned one
    with the objective-consistency term at weight `consistency`); with `folder`, trained there
    by `nasdose train` (the same training) so that it can teach a student."""
    cfg = train_config(s, seed, conditioned, device, consistency)
    if folder is not None:
        nasdose_train(cfg, Inputs(data), folder, official=False)
        return load_model_or_ensemble(folder).eval()
    seed_everything(seed)
    model = build_model(cfg.model, extra=extra_inputs(data))
    model.load_state_dict(train_model(model, cfg, data).best_state)
    return model.eval()


def distil(s: Settings, data: Path, teacher: Path, seed: int, device: str, out: Path) -> dict[str, Conditioned]:
    """A conditioned student of `s.student_widths` distilled from the run `teacher` across its
    plans with the teacher's budget, and its twin trained alone (`baseline`), in eval mode."""
    cfg = DistillConfig(
        student="unet3d:widths=" + ",".join(map(str, s.student_widths)),
        train=TrainConfig(data=DataConfig(batch_size=s.batch, augment=AugmentConfig(enabled=False), plans=True),
                          optim=OptimConfig(lr=s.lr), epochs=s.epochs, steps_per_epoch=s.steps),
        latency=LatencyConfig(size=s.grid, runs=1), seed=seed, runtime=RuntimeConfig(device=device, threads=s.threads))
    nasdose_distill(cfg, DistillInputs(teacher, data), out)
    models = {name: load_model_or_ensemble(out / name).eval() for name in ("student", "baseline")}
    assert all(isinstance(m, Conditioned) for m in models.values())
    return cast(dict[str, Conditioned], models)


def official(s: Settings, seed: int, device: str, folder: Path) -> dict[str, float]:
    """The official validation scores (source grid) of a plain and a conditioned model trained
    alike on `s.openkbp` by `nasdose train`, which scores the conditioned one at each patient's own
    measured preferences; the runs go to `folder`."""
    out = {}
    for name, conditioned in (("plain", False), ("conditioned", True)):
        run = folder / f"{name}_seed{seed}"
        nasdose_train(train_config(s, seed, conditioned, device), Inputs(Path(s.openkbp)), run)
        scores = load_json(run / "metrics.json").get("official_val_scores")
        if scores is None:
            raise NasDoseError(f"{s.openkbp}: not a resampled data set (no official scores on a source grid)")
        out[f"{name}_dose_score"], out[f"{name}_dvh_score"] = scores["dose_score"], scores["dvh_score"]
    return {**out, "dose_ratio": out["conditioned_dose_score"] / out["plain_dose_score"],
            "dvh_ratio": out["conditioned_dvh_score"] / out["plain_dvh_score"]}


def _rho(x: list[float], y: list[float]) -> float | None:
    """Spearman ρ, None where one side is constant (an OAR the dose never reaches)."""
    if len(set(np.round(y, 6))) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def evaluate(s: HeldOutPlans, plain: torch.nn.Module | None, conditioned: torch.nn.Module, held: Path,
             runtime: Runtime) -> dict[str, Any]:
    """Dose scores of both models against every held-out plan (the conditioned one's alone when
    `plain` is None); monotonicity of the conditioned one (a network or an ensemble of them)."""
    plain_err, cond_err, oar_rho, hi_rho, hi_gap = [], [], [], [], []
    with open_data(held) as data:
        for pid in data.ids()[:s.held_out]:
            p = data.read(pid)
            _, values = data.plan_preferences(pid)
            plans = data.read_plans(pid)
            assert plans is not None
            mean_plan = predict_patient(plain, p, runtime) if plain is not None else None
            for k, dose in enumerate(plans.doses):
                if mean_plan is not None:
                    plain_err.append(dose_error(mean_plan, dose, p.possible_dose_mask))
                asked = predict_patient(Preset(conditioned, values[k].tolist()), p, runtime)
                cond_err.append(dose_error(asked, dose, p.possible_dose_mask))
                hi_gap.append(abs(homogeneity_index(asked, p.structures["PTV70"]) - float(values[k, 1])))
            hi = float(np.median(values[:, 1]))
            swept = [predict_patient(Preset(conditioned, [w, hi]), p, runtime) for w in s.sweep]
            outside = p.possible_dose_mask & ~np.logical_or.reduce([p.structures[t] for t in TARGETS
                                                                    if t in p.structures])
            rhos = [_rho(s.sweep, [-float(d[m].mean()) for d in swept])
                    for o in SPARED if o in p.structures and (m := p.structures[o] & outside).any()]
            if known := [r for r in rhos if r is not None]:
                oar_rho.append(statistics.fmean(known))
            his = [homogeneity_index(predict_patient(Preset(conditioned, [0.5, h]), p, runtime), p.structures["PTV70"])
                   for h in s.hi_sweep]
            if (r := _rho(s.hi_sweep, his)) is not None:
                hi_rho.append(r)
    cond_score = statistics.fmean(cond_err)
    versus = {} if plain is None else {"plain_dose_score": (plain_score := statistics.fmean(plain_err)),
                                       "improvement": 1.0 - cond_score / plain_score}
    return {**versus, "conditioned_dose_score": cond_score,
            "oar_rho": statistics.fmean(oar_rho) if oar_rho else float("nan"), "oar_rho_patients": oar_rho,
            "hi_rho": statistics.fmean(hi_rho) if hi_rho else float("nan"), "hi_rho_patients": hi_rho,
            "hi_abs_gap": statistics.fmean(hi_gap), "plans": len(cond_err)}


def _against_plans(path: Path, ids: Callable[[DataFile], list[str]], dose: Callable[[Patient, Plans], np.ndarray]
                   ) -> float:
    """Mean dose score of one dose per patient (`dose(patient, plans)`) against each of its plans."""
    errors = []
    with open_data(path) as data:
        for pid in ids(data):
            p, plans = data.read(pid), data.read_plans(pid)
            assert plans is not None
            d = dose(p, plans)
            errors += [dose_error(d, plan, p.possible_dose_mask) for plan in plans.doses]
    return statistics.fmean(errors)


def plain_floor(s: HeldOutPlans, held: Path) -> float:
    """The dose score of each held-out patient's per-voxel median plan against its plans: the
    least error any one dose per patient can have, so the least a plain model can reach."""
    return _against_plans(held, lambda d: d.ids()[:s.held_out],
                          lambda _, plans: np.median(np.stack(plans.doses), axis=0))


def fit_score(s: Settings, plain: Predictor, data: Path, runtime: Runtime) -> float:
    """The plain model's dose score on `s.fit_patients` of its own training phantoms: beside the
    held-out score it tells a model that cannot fit its data from one that does not generalise."""
    return _against_plans(data, lambda d: d.ids("train")[:s.fit_patients],
                          lambda p, _: predict_patient(plain, p, runtime))


Arms = Callable[[int, Path, Path], Iterator[tuple[str, torch.nn.Module, dict[str, Any]]]]


def score_arms(s: HeldOutPlans, device: torch.device, arms: Arms) -> tuple[list[dict[str, Any]], float]:
    """Per seed, each conditioned model (or ensemble) that `arms(seed, data, folder)` trains and
    yields with its name and more figures, scored on every held-out plan and timed (training and
    scoring); the records per seed, and the wall seconds."""
    started = time.perf_counter()
    set_quiet(True)
    runtime = Runtime(RuntimeConfig(device=str(device), threads=s.threads))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data, held = make_data(s, Path(tmp))
        for seed in s.seeds:
            record: dict[str, Any] = {"seed": seed}
            t0 = time.perf_counter()
            for name, model, info in arms(seed, data, Path(tmp)):
                r = record[name] = {**evaluate(s, None, model, held, runtime), **info,
                                    "seconds": round(time.perf_counter() - t0, 1)}
                print(f"  seed {seed}, {name}: dose score {r['conditioned_dose_score']:.3f} Gy, oar ρ "
                      f"{r['oar_rho']:.3f}; {r['seconds']:.0f} s", flush=True)
                t0 = time.perf_counter()
            runs.append(record)
    return runs, time.perf_counter() - started


def arm_stat(runs: list[dict[str, Any]], name: str, key: str) -> tuple[float, float]:
    """Mean and sd over seeds of an arm's figure."""
    return mean_sd([r[name][key] for r in runs])


def paired_gain(runs: list[dict[str, Any]], name: str, reference: str) -> str:
    """How much better an arm's dose score is than the reference arm's, paired by seed."""
    gain = [1 - r[name]["conditioned_dose_score"] / r[reference]["conditioned_dose_score"] for r in runs]
    return (f"vs {reference}: {100 * statistics.fmean(gain):+.1f} % ± {100 * mean_sd(gain)[1]:.1f}, "
            f"better in {sum(g > 0 for g in gain)} of {len(gain)} seeds")


def latency(s: Settings, device: torch.device) -> dict[str, float]:
    """Median seconds of one forward pass, conditioned, plain and conditioned student, at each
    latency grid (fresh weights)."""
    out = {}
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    for i, grid in enumerate(s.latency_grids):
        repeats = s.latency_repeats if i == 0 else max(2, s.latency_repeats // 10)
        seed_everything(0)
        extra = ("beam_plate",) if s.beam_plates else ()
        cond = build_model(ModelConfig(kwargs={"widths": list(s.widths)}, conditioning="film"),
                           extra=extra).to(device).eval()
        plain = build_model(ModelConfig(kwargs={"widths": list(s.widths)}), extra=extra).to(device).eval()
        student = build_model(ModelConfig(kwargs={"widths": list(s.student_widths)}, conditioning="film"),
                              extra=extra).to(device).eval()
        x = torch.randn(1, IN_CHANNELS + len(extra), grid, grid, grid, device=device)
        prefs = torch.tensor([[0.5, 0.15]], device=device)

        def forward(net: torch.nn.Module, *args: torch.Tensor) -> None:
            with torch.inference_mode():
                net(*args)

        cases = {"conditioned": lambda: forward(cond, x, prefs), "plain": lambda: forward(plain, x),
                 "student": lambda: forward(student, x, prefs)}
        timings, failed = time_cases(cases, device, warmup=2, repeats=repeats)
        if failed:
            raise RuntimeError(f"latency at {grid}³: {failed}")
        out[f"conditioned_{grid}_s"] = timings["conditioned"].median_s
        out[f"plain_{grid}_s"] = timings["plain"].median_s
        out[f"student_{grid}_s"] = timings["student"].median_s
    return out


def run(quick: bool, device: str = "auto", settings: Settings | None = None) -> dict[str, Any]:
    """Benchmark entry point: the measurement at `quick` size (or `settings`) in a temporary folder."""
    dev = resolve_device(device)
    s = settings or (Settings().quick() if quick else Settings())
    print(f"preferences: {budget(s)}; seeds {s.seeds}", flush=True)
    started = time.perf_counter()
    set_quiet(True)
    runs = []
    runtime = Runtime(RuntimeConfig(device=str(dev), threads=s.threads))
    c = "consistency"
    with tempfile.TemporaryDirectory() as tmp:
        data, held = make_data(s, Path(tmp))
        floor = plain_floor(s, held)
        for seed in s.seeds:
            t0 = time.perf_counter()
            teacher = Path(tmp) / f"teacher_seed{seed}" if s.distil else None
            plain = train(s, data, seed, False, str(dev))
            conditioned = train(s, data, seed, True, str(dev), folder=None if s.consistency else teacher)
            assert isinstance(conditioned, Conditioned)
            record = {"seed": seed, **evaluate(s, plain, conditioned, held, runtime), "floor_dose_score": floor,
                      "plain_fit_dose_score": fit_score(s, plain, data, runtime)}
            if s.consistency:
                consistent = train(s, data, seed, True, str(dev), s.consistency, folder=teacher)
                assert isinstance(consistent, Conditioned)
                record[c] = evaluate(s, plain, consistent, held, runtime)
            if teacher is not None:
                students = distil(s, data, teacher, seed, str(dev), Path(tmp) / f"distil_seed{seed}")
                for name, model in students.items():
                    record[name] = evaluate(s, plain, model, held, runtime)
            if s.openkbp:
                record["openkbp"] = official(s, seed, str(dev), Path(tmp))
            record["seconds"] = round(time.perf_counter() - t0, 1)
            runs.append(record)
            print(f"  seed {seed}: dose score plain {record['plain_dose_score']:.3f} Gy, conditioned "
                  f"{record['conditioned_dose_score']:.3f} Gy ({100 * record['improvement']:+.1f} %); OAR ρ "
                  f"{record['oar_rho']:.3f}, HI ρ {record['hi_rho']:.3f}; {record['seconds']:.0f} s", flush=True)
            for name, label in ((c, f"with consistency {s.consistency:g}"), ("student", f"student {s.student_widths}"),
                                ("baseline", f"student's twin {s.student_widths}")):
                if name in record:
                    r = record[name]
                    print(f"  seed {seed}, {label}: dose score {r['conditioned_dose_score']:.3f} Gy "
                          f"({100 * r['improvement']:+.1f} % vs plain); OAR ρ {r['oar_rho']:.3f}, HI ρ "
                          f"{r['hi_rho']:.3f}, |HI gap| {r['hi_abs_gap']:.3f}", flush=True)
            if s.openkbp:
                k = record["openkbp"]
                print(f"  seed {seed}, {s.openkbp}: official dose / DVH score plain {k['plain_dose_score']:.3f} / "
                      f"{k['plain_dvh_score']:.3f} Gy, conditioned at the measured preferences "
                      f"{k['conditioned_dose_score']:.3f} / {k['conditioned_dvh_score']:.3f} Gy", flush=True)
    times = latency(s, dev)
    wall = time.perf_counter() - started

    def stat(key: str, part: str | None = None) -> tuple[float, float]:
        return mean_sd([(r[part] if part else r)[key] for r in runs])

    w = f"with consistency {s.consistency:g}"
    n = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}, {runs[0]['plans']} held-out plans"
    rows = [
        Row(f"dose score improvement, conditioned vs plain ({n})", stat("improvement")[0], low=0.2,
            detail="mean ± sd {:.3f} ± {:.3f}; ".format(*stat("improvement"))
                   + "conditioned {:.3f} ± {:.3f} Gy, ".format(*stat("conditioned_dose_score"))
                   + "plain {:.3f} ± {:.3f} Gy".format(*stat("plain_dose_score"))),
        Row(f"plain model on {s.fit_patients} of its training phantoms: dose score (Gy)",
            stat("plain_fit_dose_score")[0],
            detail="mean ± sd {:.3f} ± {:.3f}; far below the held-out score: it does not generalise; ".format(
                *stat("plain_fit_dose_score")) + "close to it: it cannot fit its data"),
        Row("floor of any plain model: dose score of each patient's per-voxel median plan (Gy)",
            stat("floor_dose_score")[0], detail="the least error one dose per patient can have against its plans"),
        Row(f"Spearman ρ, oar slider vs spared-OAR mean dose falling ({s.held_out} patients)", stat("oar_rho")[0],
            low=0.95, detail="mean ± sd over seeds {:.3f} ± {:.3f}; sweep {}".format(*stat("oar_rho"), s.sweep)),
        Row(f"Spearman ρ, hi slider vs predicted PTV70 HI ({s.held_out} patients)", stat("hi_rho")[0],
            detail="mean ± sd {:.3f} ± {:.3f}; ".format(*stat("hi_rho"))
                   + "|predicted HI - plan's HI| {:.3f} ± {:.3f}".format(*stat("hi_abs_gap"))),
    ] + ([
        Row(f"{w}: dose score improvement vs plain", stat("improvement", c)[0], low=0.2,
            detail="mean ± sd {:.3f} ± {:.3f}; ".format(*stat("improvement", c))
                   + "conditioned with the term {:.3f} ± {:.3f} Gy".format(*stat("conditioned_dose_score", c))),
        Row(f"{w}: Spearman ρ, oar slider vs spared-OAR mean dose falling", stat("oar_rho", c)[0], low=0.95,
            detail="mean ± sd over seeds {:.3f} ± {:.3f}".format(*stat("oar_rho", c))),
        Row(f"{w}: Spearman ρ, hi slider vs predicted PTV70 HI", stat("hi_rho", c)[0],
            detail="mean ± sd {:.3f} ± {:.3f}; ".format(*stat("hi_rho", c))
                   + "|predicted HI - plan's HI| {:.3f} ± {:.3f}".format(*stat("hi_abs_gap", c))),
    ] if s.consistency else []) + [
        Row(f"{label}: dose score improvement vs plain", stat("improvement", name)[0], low=0.2,
            detail="mean ± sd {:.3f} ± {:.3f}; ".format(*stat("improvement", name))
                   + "{:.3f} ± {:.3f} Gy; ".format(*stat("conditioned_dose_score", name))
                   + "oar ρ {:.3f} ± {:.3f}".format(*stat("oar_rho", name)))
        for name, label in (("student", f"conditioned student {s.student_widths}, distilled"),
                            ("baseline", f"conditioned student {s.student_widths}, no teacher (twin)"))
        if s.distil] + ([
        Row(f"{s.openkbp}: official {kind} score, conditioned at each patient's measured preferences ÷ plain",
            stat(f"{key}_ratio", "openkbp")[0], high=1.0,
            detail="mean ± sd {:.3f} ± {:.3f}; conditioned {:.3f} ± {:.3f} Gy, plain {:.3f} ± {:.3f} Gy; "
                   "validation, source grid".format(*stat(f"{key}_ratio", "openkbp"),
                                                    *stat(f"conditioned_{key}_score", "openkbp"),
                                                    *stat(f"plain_{key}_score", "openkbp")))
        for kind, key in (("dose", "dose"), ("DVH", "dvh"))
    ] if s.openkbp else []) + [
        row for g in s.latency_grids for row in (
            Row(f"latency, conditioned forward at {g}³ (ms)", 1000 * times[f"conditioned_{g}_s"],
                detail=f"plain {1000 * times[f'plain_{g}_s']:.1f} ms; batch 1, {s.threads} thread(s)"),
            Row(f"latency, conditioned student (U-Net widths {s.student_widths}) forward at {g}³ (ms)",
                1000 * times[f"student_{g}_s"], high=50 if g == 32 else None,
                detail=f"batch 1, {s.threads} thread(s)"))]
    return result("preferences", dev, rows,
                  measurements={"settings": asdict(s), "runs": runs, "latency_s": times, "wall_seconds": wall},
                  notes=[f"budget: {budget(s)}", f"wall time {wall / 60:.1f} min"])


def budget(s: Settings) -> str:
    return (f"U-Net widths {s.widths} at {s.grid}³; {s.patients} training phantoms and {s.held_out} held-out "
            f"(seed {s.held_out_seed}), {s.plans} plans each{', beam plates' if s.beam_plates else ''}; "
            f"{s.epochs}×{s.steps} steps, batch {s.batch}, lr {s.lr}")


if __name__ == "__main__":
    bench_main("preferences", run, __doc__.splitlines()[0], add=partial(add_settings_arguments, defaults=Settings()),
               options=partial(settings_option, defaults=Settings()))
