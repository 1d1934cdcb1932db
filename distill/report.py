"""The comparison table: student vs ensemble vs best single member vs the student's architecture
trained without distillation, on validation scores, size, cost, latency and file size."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from nas_dose.config import at_least
from nas_dose.data.dataset import IN_CHANNELS, PlanItem
from nas_dose.data.store import open_data
from nas_dose.inference import Cascade, Ensemble, Predictor, predict_plans, predictions, score_plans
from nas_dose.models.conditioning import Preset
from nas_dose.models.factory import load_model, spec_inputs
from nas_dose.models.refiner import REFINER_CHANNELS
from nas_dose.runtime import Runtime
from nas_dose.scores import Scores, score_on_source
from nas_dose.search_spaces import count_flops, count_params, forward_latency

from .teacher import member_checkpoints, teacher_files

BASELINE = "student arch., no distillation"
TEACHER = "ensemble (teacher"  # its row's name, then the member count
MIN_TEACHER_LEAD = 0.03  # a smaller lead is within a small network's spread over seeds


@dataclass
class LatencyConfig:
    """Latency is the median of `runs` forward passes on one `size`³ volume (batch 1)."""

    size: int = 128
    runs: int = 3

    def validate(self) -> None:
        for key in ("size", "runs"):
            at_least(f"latency.{key}", getattr(self, key), 1)


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


def score_predictor(predictor: Predictor | Cascade, data: Path, ids: Sequence[str], runtime: Runtime,
                    items: Sequence[PlanItem] | None = None, extra: Sequence[str] | None = None) -> Scores:
    """Official dose and DVH scores of a predictor's doses (as `nasdose predict` writes them, on
    the source grid); a conditioned one's on each of `items` against its plan. `extra`: the
    extra input channels it takes (default: the data set's)."""
    with open_data(data) as d:
        if extra is not None:
            d.only_extra(extra)
        if items is not None and not isinstance(predictor, Cascade):
            return score_plans(d, items, predict_plans(cast(nn.Module, predictor), d, items, runtime))
        return score_on_source(d, predictions(predictor, d, list(ids), runtime)[1])


def latency(model: nn.Module, size: int, runs: int, device: torch.device, channels: int = IN_CHANNELS) -> float:
    """Median seconds of `runs` float32 forward passes on one (1, channels, size³) volume, after
    one untimed warm-up pass."""
    return forward_latency(model, (1, channels, size, size, size), device, runs)


def cost(model: nn.Module, grid: int, latency_size: int, runs: int,
         channels: int = IN_CHANNELS) -> dict[str, float | int | None]:
    """Parameters, FLOPs at `grid`, CPU latency and (with CUDA) GPU latency, for inputs of
    `channels` channels."""
    gpu = None
    if torch.cuda.is_available():
        gpu = latency(model, latency_size, runs, torch.device("cuda"), channels)
    cpu = latency(model, latency_size, runs, torch.device("cpu"), channels)
    return {"params": count_params(model), "flops": count_flops(model, (1, channels, grid, grid, grid)),
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


@dataclass(frozen=True)
class Mode:
    """How a distillation's networks run: whole volumes on the data set's grid, or as the
    full-resolution stage of the teacher's cascade (windows of its patch side on the source grid,
    one input channel more: the coarse dose)."""

    grid: int  # the data set's
    source: int  # its patients' source grid
    cascade: Cascade | None = None
    items: tuple[PlanItem, ...] | None = None  # a conditioned teacher's validation plans, scored each
    extra: tuple[str, ...] = ()  # the data set's extra input channels (`extra_inputs`)

    def costed(self, model: nn.Module) -> nn.Module:
        """What the costs are measured on: a conditioned model at its first validation plan's
        preferences (a setting costs what any other does)."""
        return model if self.items is None else Preset(model, self.items[0].values.tolist())

    @property
    def size(self) -> int:
        """The side a network's FLOPs are counted at and it is exported for."""
        return self.grid if self.cascade is None else self.cascade.config.patch

    @property
    def channels(self) -> int:
        return IN_CHANNELS + len(self.extra) if self.cascade is None else REFINER_CHANNELS

    @property
    def cache_grid(self) -> int:
        """The teacher's predictions' grid: the data set's, or the source grid of a cascade's."""
        return self.grid if self.cascade is None else self.source

    def predictor(self, model: nn.Module, runtime: Runtime) -> Predictor | Cascade:
        net = runtime.prepare(model).eval()
        return net if self.cascade is None else Cascade(self.cascade.coarse, net, self.cascade.config)


def file_size(*files: Path) -> int:
    return sum(f.stat().st_size for f in files)


def model_row(name: str, arch: str, model: nn.Module, files: list[Path], data: Path, ids: list[str],
               stage: Mode, latency_cfg: LatencyConfig, runtime: Runtime, scores: Scores | None = None) -> Row:
    """A network's row; `stage.extra` are the extra input channels it takes."""
    s = scores or score_predictor(stage.predictor(model, runtime), data, ids, runtime, stage.items, stage.extra)
    return Row(name, arch, s.dose_score, s.dvh_score, checkpoint_bytes=file_size(*files),
               **cost(stage.costed(model), stage.size, latency_cfg.size, latency_cfg.runs, stage.channels))  # type: ignore[arg-type]


def architecture(model_config: dict[str, Any]) -> str:
    genotype = model_config.get("genotype")
    if genotype is not None:
        macro, choices = genotype["macro"], genotype.get("choices", {})
        sized = "".join(f", {k} {choices[k]}{unit}" for k, unit in (("width", " %"), ("depth", "")) if k in choices)
        return (f"{genotype['space']} genotype, stem {macro['stem']}, widths {','.join(map(str, macro['widths']))}"
                + sized)  # a space's width and depth slots (lenas_levels) scale and cut the macro
    kwargs = ", ".join(f"{k}={v}" for k, v in model_config.get("kwargs", {}).items())
    return f"{model_config['name']}({kwargs})"


def comparison_rows(teacher_path: Path, teacher: nn.Module | None, cache: Path | None, out: Path, data: Path,
                    ids: list[str], stage: Mode, latency_cfg: LatencyConfig, runtime: Runtime,
                    baseline: bool) -> list[Row]:
    """Student, ensemble, best single member (for an ensemble teacher), baseline; without a
    `teacher` (one that takes privileged inputs) the student and the baseline alone."""
    rows = []
    model, meta = load_model(out / "student")
    arch = architecture(meta["model_config"])
    # the student and its baseline may not take every extra input channel (`train.data.hide`)
    seen = replace(stage, extra=spec_inputs(meta["model_config"])) if stage.cascade is None else stage
    rows.append(model_row("student (distilled)", arch, model, [out / "student" / "best.pt"], data, ids, seen,
                           latency_cfg, runtime))
    if teacher is not None and cache is not None:
        rows += teacher_rows(teacher_path, teacher, cache, data, ids, stage, latency_cfg, runtime)
    if baseline:
        model, _ = load_model(out / "baseline")
        rows.append(model_row(BASELINE, arch, model, [out / "baseline" / "best.pt"],
                               data, ids, seen, latency_cfg, runtime))
    return rows


def teacher_rows(teacher_path: Path, teacher: nn.Module, cache: Path, data: Path, ids: list[str], stage: Mode,
                 latency_cfg: LatencyConfig, runtime: Runtime) -> list[Row]:
    """The teacher, scored on its cached predictions, and its best single member."""
    rows = []
    with open_data(data) as d, open_data(cache) as c:
        s = (score_on_source(d, ((pid, c.read_dose(pid)) for pid in ids)) if stage.items is None
             else score_plans(d, stage.items, ((i.key, c.read_dose(i.key)) for i in stage.items)))
    n = len(teacher.members) if isinstance(teacher, Ensemble) else 1
    rows.append(Row(f"{TEACHER}, {n} member{'s' if n > 1 else ''})", "ensemble" if n > 1 else "teacher",
                    s.dose_score, s.dvh_score, checkpoint_bytes=file_size(*teacher_files(teacher_path)),
                    **cost(stage.costed(teacher), stage.size, latency_cfg.size, latency_cfg.runs, stage.channels)))  # type: ignore[arg-type]
    if isinstance(teacher, Ensemble):
        singles = [Ensemble([m], [1.0], teacher.tta) for m in teacher.members]
        scores = [score_predictor(stage.predictor(m, runtime), data, ids, runtime, stage.items) for m in singles]
        best = min(range(n), key=lambda i: scores[i].dose_score)
        checkpoint = member_checkpoints(teacher_path)[best]
        rows.append(model_row(f"best single member ({teacher.names[best]})",
                               architecture(load_model(checkpoint)[1]["model_config"]), singles[best],
                               [checkpoint], data, ids, stage, latency_cfg, runtime, scores[best]))
    return rows


def idle_teacher(rows: Sequence[Row], min_lead: float = MIN_TEACHER_LEAD) -> str | None:
    """A warning when the teacher's validation dose score leads the baseline's by less than
    `min_lead` (relative): the student learns the teacher's doses, so it can gain on its twin about
    as much as the teacher leads it, and less than that is within the spread of seeds."""
    teacher = next((r for r in rows if r.name.startswith(TEACHER)), None)
    baseline = next((r for r in rows if r.name == BASELINE), None)
    if teacher is None or baseline is None:
        return None
    lead = 1 - teacher.dose_score / baseline.dose_score
    if lead >= min_lead:
        return None
    how = "no better than" if lead <= 0 else f"only {100 * lead:.1f} % better than"
    return (f"the teacher's validation dose score ({teacher.dose_score:.3f} Gy) is {how} the student's architecture "
            f"trained alone ({baseline.dose_score:.3f} Gy): it has little to teach; distil from a teacher at least "
            f"{100 * min_lead:.0f} % ahead")
