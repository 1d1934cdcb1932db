"""What each runtime setting does to a training step, applied through `nas_dose.runtime.Runtime`
exactly as `nasdose train` applies it (`runtime.*` config keys).

Phase 1 times a baseline (every setting off: fp32, eager, contiguous layout, no autotuning, the
process's default thread count) interleaved with each setting switched on alone: on a GPU
cuDNN autotuning, mixed precision (bf16, or fp16 where bf16 is unsupported), channels-last and
torch.compile; on a CPU the thread counts, channels-last and torch.compile (mixed precision and
cuDNN do not apply: Runtime uses neither on a CPU). Phase 2 times the baseline against the
nasdose defaults (`RuntimeConfig()`) and against the combination of every setting that helped.
Ratios are training steps/s ÷ the baseline's: > 1 means the setting speeds training up.

    python benchmarks/bench_runtime.py --quick
"""
from __future__ import annotations

import os
from typing import Any

import torch

from nas_dose.runtime import Runtime, RuntimeConfig, resolve_device

from common import (
    Case,
    Row,
    Stepper,
    Workload,
    genotype_network,
    main,
    random_batch,
    result,
    si,
    speedup,
    time_cases,
    torch_state_restored,
    workload,
)

# A setting "helped" when it made the step at least this much faster: smaller gains are within
# the noise of a shared machine and are not worth combining.
HELPS = 1.02


def thread_counts(default: int) -> list[int]:
    """1, powers of two and the core count, without the default (the baseline's)."""
    cores = os.cpu_count() or 1
    counts = {1, cores, *(2 ** k for k in range(1, cores.bit_length()) if 2 ** k <= cores)}
    return sorted(counts - {default})


def settings(device: torch.device, quick: bool, threads: int) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Single-setting variants (label -> RuntimeConfig changes), and the skipped ones with why."""
    skipped: dict[str, str] = {}
    single: dict[str, dict[str, Any]] = {}
    if device.type == "cuda":
        single["cudnn.benchmark"] = {"cudnn_benchmark": True}
        single["amp"] = {"amp": "auto"}
    else:
        skipped["cudnn.benchmark"] = "no GPU (cuDNN is CUDA only)"
        skipped["amp"] = "no GPU (Runtime uses no AMP on a CPU)"
        single.update({f"threads={t}": {"threads": t} for t in thread_counts(threads)})
    single["channels_last"] = {"channels_last": True}
    if quick and device.type == "cpu":
        skipped["compile"] = "not in --quick on a CPU (its first step compiles for minutes); run without --quick"
    else:
        single["compile"] = {"compile": True}
    return single, skipped


def run(quick: bool, device: str = "auto", w: Workload | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    w = w or workload(quick, dev)
    threads = torch.get_num_threads()
    # Every setting off; threads explicit so a variant's thread count never carries over.
    baseline = {"device": str(dev), "cudnn_benchmark": False, "amp": "off", "channels_last": False,
                "compile": False, "threads": threads}
    model, batch = genotype_network(w), random_batch(w)

    def time_configs(configs: dict[str, dict[str, Any]]) -> tuple[dict, dict[str, str]]:
        cases = {}
        for label, cfg in configs.items():
            config = RuntimeConfig(**cfg)
            stepper = Stepper(model, Runtime(config), batch)
            cases[label] = Case(stepper.train, enter=lambda c=config: Runtime(c))
        return time_cases(cases, dev, w.warmup, w.repeats)

    single, skipped = settings(dev, quick, threads)
    with torch_state_restored():
        phase1, failed = time_configs({"baseline": baseline, **{k: {**baseline, **v} for k, v in single.items()}})
        base = phase1["baseline"]
        gains = {k: speedup(phase1[k], base) for k in single if k in phase1}
        helped = [k for k, g in gains.items() if g >= HELPS]
        best_threads = max((k for k in helped if k.startswith("threads=")), key=gains.get, default=None)
        combo_keys = [k for k in helped if not k.startswith("threads=") or k == best_threads]
        combo = {**baseline, **{key: v for k in combo_keys for key, v in single[k].items()}}
        defaults = {"device": str(dev), "threads": threads}  # RuntimeConfig() in a fresh process
        phase2_configs = {"baseline": baseline}
        if Runtime(RuntimeConfig(**defaults)).describe() != Runtime(RuntimeConfig(**baseline)).describe():
            phase2_configs["defaults"] = defaults
        if len(combo_keys) > 1:
            phase2_configs["combination"] = combo
        phase2, failed2 = time_configs(phase2_configs) if len(phase2_configs) > 1 else ({}, {})

    def row(label: str, timings: dict, key: str, low: float | None = None, detail: str = "") -> Row:
        t, b = timings[key], timings["baseline"]
        first = f"; first step {t.first_s:.1f} s" if key == "compile" else ""
        return Row(f"{label} steps/s ÷ baseline", speedup(t, b), low=low,
                   detail=f"{si(t.rate(w.voxels), 'vox/s')} vs {si(b.rate(w.voxels), 'vox/s')}{first}{detail}")

    rows = [Row(f"{k} steps/s ÷ baseline", skipped=why) for k, why in skipped.items()]
    rows += [row(k, phase1, k) if k in phase1 else Row(f"{k} steps/s ÷ baseline", skipped=failed[k])
             for k in single]
    if "defaults" in phase2_configs:
        rows.append(row("nasdose defaults", phase2, "defaults") if "defaults" in phase2
                    else Row("nasdose defaults steps/s ÷ baseline", skipped=failed2["defaults"]))
    if "combination" in phase2_configs:
        rows.append(row("best combination", phase2, "combination", low=1.0, detail=f"; {' + '.join(combo_keys)}")
                    if "combination" in phase2 else Row("best combination steps/s ÷ baseline",
                                                        skipped=f"{' + '.join(combo_keys)}: {failed2['combination']}"))
    elif combo_keys:
        rows.append(row("best combination", phase1, combo_keys[0], low=1.0,
                        detail=f"; only {combo_keys[0]} helped (phase 1)"))
    else:
        rows.append(Row("best combination steps/s ÷ baseline",
                        skipped=f"no setting helped by ≥ {HELPS:g}×: the baseline is best"))
    measurements = {"phase1": {k: t.to_dict() for k, t in phase1.items()},
                    "phase2": {k: t.to_dict() for k, t in phase2.items()},
                    "configs": {"baseline": baseline, **single}, "combination": combo_keys}
    notes = [f"baseline: fp32, eager, contiguous, cudnn.benchmark off, {threads} threads"]
    return result("runtime", dev, rows, w=w, measurements=measurements, notes=notes)


if __name__ == "__main__":
    main("runtime", run, __doc__.split("\n\n")[0])
