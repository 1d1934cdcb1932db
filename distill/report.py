"""The comparison table: student vs ensemble vs best single member vs the student's architecture
trained without distillation, on validation scores, size, cost, latency and file size."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nas_dose.data.dataset import IN_CHANNELS
from nas_dose.data.store import open_data
from nas_dose.inference import Predictor, predict_patients
from nas_dose.runtime import Runtime
from nas_dose.scores import Scores, score_on_source
from nas_dose.search_spaces import count_flops, count_params


@dataclass
class Row:
    """One model of the table. Latencies are medians in seconds (None where not measured)."""

    name: str
    model: str
    dose_score: float
    dvh_score: float
    params: int
    flops: int
    cpu_latency_s: float | None
    gpu_latency_s: float | None
    checkpoint_bytes: int


def score_predictor(predictor: Predictor, data: Path, ids: Sequence[str], runtime: Runtime) -> Scores:
    """Official dose and DVH scores of a predictor's doses (as `nasdose predict` writes them, on
    the source grid)."""
    with open_data(data) as d:
        return score_on_source(d, predict_patients(predictor, d, list(ids), runtime))


def latency(model: nn.Module, size: int, runs: int, device: torch.device) -> float:
    """Median seconds of `runs` forward passes on one (1, IN_CHANNELS, size³) volume, after one
    untimed warm-up pass, in eval mode without autograd."""
    model = model.to(device).eval()
    x = torch.zeros(1, IN_CHANNELS, size, size, size, device=device)
    times = []
    with torch.inference_mode():
        for i in range(runs + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost(model: nn.Module, grid: int, latency_size: int, runs: int) -> dict[str, float | int | None]:
    """Parameters, FLOPs at the data grid, CPU latency and (with CUDA) GPU latency."""
    gpu = None
    if torch.cuda.is_available():
        gpu = latency(model, latency_size, runs, torch.device("cuda"))
    cpu = latency(model, latency_size, runs, torch.device("cpu"))
    return {"params": count_params(model), "flops": count_flops(model, (1, IN_CHANNELS, grid, grid, grid)),
            "cpu_latency_s": cpu, "gpu_latency_s": gpu}


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _si(value: float) -> str:
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g}"


def comparison_table(rows: Sequence[Row], grid: int, latency_size: int) -> str:
    """A Markdown table (readable as text) of the rows."""
    header = ["model", "architecture", "dose score (Gy)", "DVH score (Gy)", "params", f"FLOPs @{grid}³",
              f"CPU latency @{latency_size}³ (s)", f"GPU latency @{latency_size}³ (s)", "checkpoint"]
    lines = [header] + [[r.name, r.model, _num(r.dose_score, ".3f"), _num(r.dvh_score, ".3f"), _si(r.params),
                         _si(r.flops), _num(r.cpu_latency_s, ".3g"), _num(r.gpu_latency_s, ".3g"),
                         f"{_si(r.checkpoint_bytes)}B"] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([render(lines[0]), rule, *(render(line) for line in lines[1:])])
