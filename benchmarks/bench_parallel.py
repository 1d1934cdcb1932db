"""Are two trainings side by side faster than one after the other? On a CPU, `parallel=2`
(`nas_dose.parallel`, what `nasdose pipeline` uses for ensemble members and the student beside
its baseline) runs two training processes on one thread each; the alternative runs them in turn
on every thread. Both take the same optimizer steps of the same network (the all-conv LENAS
cell at the pipeline's 16³ default, stem 8, widths 16-32-64, batch 2).

Ratio: the steps per second of the two side by side (from the start of both to the end of the
later one, each timed inside its own process, so the start of the processes is left out and
reported apart) ÷ those of the two in turn. Above 1, side by side is faster.

    python benchmarks/bench_parallel.py --quick
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from nas_dose.parallel import run_side_by_side, worker_threads
from nas_dose.runtime import resolve_device

from common import Row, Stepper, Workload, default_runtime, genotype_network, main, random_batch, result

WORKLOAD = Workload(grid=16, batch=2, stem=8, widths=(16, 32, 64), warmup=5, repeats=0)
TARGET = 1.0


def train_steps(w: Workload, steps: int, threads: int) -> tuple[float, float]:
    """(start, end) wall-clock times of `steps` training steps on `threads` CPU threads, after
    `w.warmup` untimed ones."""
    torch.set_num_threads(threads)
    stepper = Stepper(genotype_network(w), default_runtime(torch.device("cpu")), random_batch(w))
    for _ in range(w.warmup):
        stepper.train()
    start = time.time()
    for _ in range(steps):
        stepper.train()
    return start, time.time()


def run(quick: bool, device: str = "auto", w: Workload = WORKLOAD) -> dict[str, Any]:
    dev = resolve_device(device)
    cores = os.cpu_count() or 1
    if dev.type != "cpu" or cores < 2:
        why = "a GPU runs one training at a time" if dev.type != "cpu" else "one core"
        return result("parallel", dev, [Row("2 trainings side by side ÷ in turn, steps/s", skipped=why)], w=w)
    steps = 60 if quick else 300
    threads = torch.get_num_threads()
    in_turn = [train_steps(w, steps, threads) for _ in range(2)]
    in_turn_s = sum(end - start for start, end in in_turn)
    launched = time.time()
    side = run_side_by_side(train_steps, [(w, steps, worker_threads(2, threads))] * 2, workers=2)
    side_s = max(end for _, end in side) - min(start for start, _ in side)
    startup_s = min(start for start, _ in side) - launched
    torch.set_num_threads(threads)
    rows = [Row("2 trainings side by side (1 thread each) ÷ in turn (all threads), steps/s", in_turn_s / side_s,
                TARGET, detail=f"{2 * steps / side_s:.1f} vs {2 * steps / in_turn_s:.1f} steps/s")]
    notes = [f"{steps} timed steps per training, {threads} thread(s) in turn, {worker_threads(2, threads)} each "
             f"side by side, {cores} cores; starting the two processes (importing torch and nasdose, building the "
             f"network, {w.warmup} warm-up steps) took {startup_s:.1f} s more: paid once per ensemble or "
             "distillation, not per step"]
    return result("parallel", dev, rows, w=w, measurements={
        "steps": steps, "in_turn_seconds": in_turn_s, "side_by_side_seconds": side_s,
        "process_start_seconds": startup_s}, notes=notes)


if __name__ == "__main__":
    main("parallel", run, __doc__.split("\n\n")[0])
