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
"""
from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import (
    Row,
    Timing,
    Workload,
    genotype_network,
    lenas_conv_genotype,
    main,
    result,
    si,
    speedup,
    synchronize,
    time_cases,
    torch_state_restored,
    workload,
)

from nas_dose.config import load_config
from nas_dose.data.dataset import IN_CHANNELS
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.distill.losses import DistillObjective
from nas_dose.distill.teacher import ensure_cache
from nas_dose.inference import Ensemble
from nas_dose.models.factory import build_model
from nas_dose.models.spec import scale_genotype
from nas_dose.progress import is_quiet, set_quiet
from nas_dose.runtime import Runtime, resolve_device, seed_everything
from nas_dose.search_spaces import count_params, save_genotype
from nas_dose.training import TrainConfig, train_model

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


def run(quick: bool, device: str = "auto", w: Workload | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
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


if __name__ == "__main__":
    main("distill", run, __doc__.split("\n\n")[0])
