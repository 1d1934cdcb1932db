"""What every benchmark shares: workloads, the measured network, one training step, interleaved
timing, the result format, the table, JSON output and the machine description.

Timings on a shared machine drift with the load, so variants are never timed one after the
other: `time_cases` warms every variant up, then times them round-robin (rotating the order each
round) and keeps medians; a ratio of two variants is the median of their per-round ratios
(`speedup`), so a load change between rounds cancels out.
On CUDA the device is synchronized before every clock read, since kernels run asynchronously.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import inspect
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from nas_dose.data.augment import AugmentConfig
from nas_dose.data.dataset import IN_CHANNELS
from nas_dose.data.store import open_data
from nas_dose.errors import NasDoseError
from nas_dose.inference import as_predictor, official_scores
from nas_dose.io import save_json
from nas_dose.runtime import Runtime, RuntimeConfig, resolve_device, seed_everything
from nas_dose.search_spaces import Genotype, build_model, get_space
from nas_dose.training import DataConfig, OptimConfig, TrainConfig, masked_loss, train_model
from nas_dose.training.optimization import make_optimizer

# The LENAS genotype with a plain 3×3×3 conv in every slot: the network the throughput
# benchmark writes out by hand, and the one the runtime and loader benchmarks train.
LENAS_CONV_CHOICES: dict[str, str] = {
    "down.op1": "conv", "down.op2": "conv", "down.connect": "identity", "down.down": "down_conv",
    "up.op1": "conv", "up.op2": "conv", "up.connect": "identity", "up.up": "up_conv",
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """Input size, network width and how many calls are timed."""

    grid: int
    batch: int
    stem: int
    widths: tuple[int, ...]
    warmup: int
    repeats: int

    @property
    def voxels(self) -> int:
        """Voxels in one batch: the unit of throughput."""
        return self.batch * self.grid ** 3

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, IN_CHANNELS, self.grid, self.grid, self.grid)

    def macro(self) -> dict[str, Any]:
        return {"in_channels": IN_CHANNELS, "out_channels": 1, "stem": self.stem, "widths": list(self.widths)}


def workload(quick: bool, device: torch.device) -> Workload:
    """The size a benchmark runs at unless its `run` is given a Workload.

    Otherwise the LENAS network (stem 16, widths 32…256) at its training size, 128³ batch 2, on
    a GPU (64³ batch 1 on a CPU). --quick: a few minutes on 2 CPU cores (32³ batch 1, widths
    4…64); on a GPU the LENAS network at 64³ batch 2."""
    lenas = get_space("lenas").default_macro()
    full = (lenas["stem"], tuple(lenas["widths"]))
    if device.type == "cuda":
        return Workload(64, 2, *full, 2, 5) if quick else Workload(128, 2, *full, 3, 10)
    return Workload(32, 1, 4, (8, 16, 32, 64), 1, 5) if quick else Workload(64, 1, *full, 2, 5)


def lenas_conv_genotype(w: Workload) -> Genotype:
    return get_space("lenas").genotype(LENAS_CONV_CHOICES, w.macro())


def genotype_network(w: Workload, seed: int = 0) -> nn.Module:
    """The all-conv LENAS network at the workload's width, freshly initialized from `seed`."""
    seed_everything(seed)
    return build_model(lenas_conv_genotype(w))


def random_batch(w: Workload, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch shaped like `DoseDataset`'s (values do not change the speed)."""
    gen = torch.Generator().manual_seed(seed)
    spatial = (w.batch, 1, w.grid, w.grid, w.grid)
    return {"input": torch.randn(w.input_shape, generator=gen),
            "target": torch.rand(spatial, generator=gen),
            "mask": (torch.rand(spatial, generator=gen) > 0.3).float()}


class Stepper:
    """A model run the way `nas_dose.training.train_model` runs it: prepared by a Runtime, Adam,
    masked L1 under the runtime's autocast and loss scaler. Owns a copy of the model, so several
    steppers can be interleaved without sharing weights or optimizer state."""

    def __init__(self, model: nn.Module, runtime: Runtime, batch: Mapping[str, torch.Tensor]) -> None:
        self.runtime = runtime
        self.model = copy.deepcopy(model)
        self.net = runtime.prepare(self.model)
        self.optimizer = make_optimizer(self.model.parameters(), OptimConfig())
        self.scaler = runtime.grad_scaler()
        self.batch = runtime.to_device(dict(batch))

    def train(self) -> None:
        """One optimizer step (the body of train_model's loop, data already on the device)."""
        self.net.train()
        with self.runtime.autocast():
            pred = self.net(self.batch["input"])
        loss = masked_loss(pred, self.batch["target"], self.batch["mask"], "l1")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def infer(self) -> None:
        """One forward pass as validation and `nasdose predict` run it."""
        self.net.eval()
        with torch.no_grad(), self.runtime.autocast():
            self.net(self.batch["input"])


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a clock read after it covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Case:
    """A variant to time: `fn` is timed; `enter` (untimed, before every call) re-applies the
    variant's process-wide settings (threads, cuDNN flags) when variants differ in them."""

    fn: Callable[[], Any]
    enter: Callable[[], Any] | None = None


@dataclasses.dataclass
class Timing:
    """Seconds of each timed call, the first warm-up call (one-off costs: compilation,
    autotuning, worker start) and the peak CUDA memory of any call (None on a CPU)."""

    seconds: list[float]
    first_s: float
    peak_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def rate(self, amount: float) -> float:
        """`amount` (voxels, samples, FLOPs) per second, at the median time."""
        return amount / self.median_s

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "seconds": self.seconds, "first_s": self.first_s,
                "peak_bytes": self.peak_bytes}


def _timed_call(case: Case, device: torch.device) -> tuple[float, int | None]:
    if case.enter is not None:
        case.enter()
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    case.fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) if cuda else None


def time_cases(cases: Mapping[str, Case | Callable[[], Any]], device: torch.device, warmup: int,
               repeats: int) -> tuple[dict[str, Timing], dict[str, str]]:
    """Time the cases interleaved: `warmup` untimed calls each, then `repeats` rounds, each case
    once per round, the order rotated every round so no case always runs after the same one.

    A case that raises during warm-up is dropped; returns (timings, {dropped case: error}).
    """
    todo = {name: c if isinstance(c, Case) else Case(c) for name, c in cases.items()}
    failed: dict[str, str] = {}
    first: dict[str, float] = {}
    peaks: dict[str, int | None] = {}
    for name, case in list(todo.items()):
        try:
            for i in range(max(warmup, 1)):
                seconds, peak = _timed_call(case, device)
                if i == 0:
                    first[name] = seconds
                peaks[name] = _max(peaks.get(name), peak)
        except Exception as e:  # reported in the table as the case's reason, never hidden
            lines = str(e).strip().splitlines()
            failed[name] = f"{type(e).__name__}: {lines[0] if lines else ''}"
            del todo[name]
    names = list(todo)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats if names else 0):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, peak = _timed_call(todo[name], device)
            samples[name].append(seconds)
            peaks[name] = _max(peaks.get(name), peak)
    return {n: Timing(samples[n], first[n], peaks.get(n)) for n in names}, failed


def speedup(new: Timing, old: Timing) -> float:
    """How many times faster `new` runs than `old`: the median over rounds of old ÷ new time in
    the same round. Both calls of a round ran moments apart, so load drift cancels in each pair."""
    return statistics.median(o / n for n, o in zip(new.seconds, old.seconds, strict=True))


def trained_score(build: Callable[[], nn.Module], data: Path, epochs: int, steps: int, seed: int, lr: float,
                  device: str, threads: int | None) -> float:
    """The benchmarks' yardstick: the network `build` makes, trained from scratch (batch 1, no
    augmentation, the same settings for every network compared) and scored on the validation
    split: the best validation dose score (Gy) as `nasdose train` chooses its checkpoint, and on a
    resampled data set that checkpoint's official score on the source grid (as `nasdose train`
    reports it). `seed` fixes the initialization (the network is built after seeding, not in
    whatever random state the caller left) and the batch order."""
    cfg = TrainConfig(epochs=epochs, steps_per_epoch=steps, seed=seed,
                      data=DataConfig(batch_size=1, augment=AugmentConfig(enabled=False)),
                      optim=OptimConfig(lr=lr), runtime=RuntimeConfig(device=device, threads=threads))
    seed_everything(cfg.seed)
    model = build()
    result = train_model(model, cfg, data)
    with open_data(data) as d:
        ids = d.ids(cfg.data.val_split)
        if all(d.source_grid(pid) == d.grid for pid in ids):
            return result.best_val_score
        model.load_state_dict(result.best_state)
        runtime = Runtime(cfg.runtime)
        return official_scores(as_predictor(Path(data), model.eval(), runtime), d, ids, runtime).dose_score


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); both NaN where a value is
    (a figure a seed could not measure), which `statistics.stdev` cannot take."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


@contextlib.contextmanager
def torch_state_restored() -> Iterator[None]:
    """Put back the process-wide settings a Runtime changes (threads, cuDNN, determinism), so
    one benchmark's settings never leak into the next."""
    threads = torch.get_num_threads()
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled())
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags[:2]
        torch.use_deterministic_algorithms(flags[2])


def default_runtime(device: torch.device, **settings: Any) -> Runtime:
    """A Runtime as users get it (RuntimeConfig defaults), with `settings` changed."""
    return Runtime(RuntimeConfig(device=str(device), **settings))


# ---------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Row:
    """One line of the table: a ratio of two measurements and its target range, if it has one.

    `skipped` says why a row was not measured (no GPU, not in --quick, failed to run).
    """

    quantity: str
    value: float | None = None
    low: float | None = None
    high: float | None = None
    detail: str = ""
    skipped: str | None = None

    @property
    def status(self) -> str:
        if self.skipped is not None:
            return "skipped"
        if self.value is None or not math.isfinite(self.value):
            return "error"
        if self.low is None and self.high is None:
            return "info"
        ok = (self.low is None or self.value >= self.low) and (self.high is None or self.value <= self.high)
        return "met" if ok else "NOT MET"

    @property
    def target(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:g}–{self.high:g}"
        if self.low is not None:
            return f"≥ {self.low:g}"
        return f"≤ {self.high:g}" if self.high is not None else ""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "target": self.target, "status": self.status}


def result(name: str, device: torch.device, rows: Sequence[Row], *, w: Workload | None = None,
           runtime: Runtime | None = None, measurements: Mapping[str, Any] | None = None,
           notes: Sequence[str] = ()) -> dict[str, Any]:
    """The dict every benchmark's `run` returns (the suite's JSON holds one per benchmark)."""
    return {"benchmark": name, "device": str(device), "workload": dataclasses.asdict(w) if w is not None else None,
            "runtime": runtime.describe() if runtime is not None else None,
            "ratios": [r.to_dict() for r in rows], "measurements": dict(measurements or {}),
            "notes": list(notes)}


def table_rows(name: str, res: Mapping[str, Any]) -> list[list[str]]:
    """Table lines of one benchmark's result. A result without `ratios` (another engineer's
    format) shows its top-level numbers as information lines."""
    ratios = res.get("ratios")
    if isinstance(ratios, list) and all(isinstance(r, dict) and "quantity" in r for r in ratios):
        return [[name, r["quantity"], fmt(r.get("value")), r.get("target", ""), r.get("status", ""),
                 r.get("skipped") or r.get("detail", "")] for r in ratios]
    lines = [[name, str(k), fmt(v), "", "info", ""] for k, v in res.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return lines or [[name, "(ran; see the JSON file)", "", "", "info", ", ".join(map(str, res))[:80]]]


def fmt(value: Any) -> str:
    """A ratio or figure with 3 significant digits; blank when there is none."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def si(value: float, unit: str) -> str:
    """1.23e6 -> '1.23 M<unit>' (thousands steps), for the detail column."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_table(lines: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable as plain text too) of benchmark lines."""
    header = ["benchmark", "ratio", "value", "target", "status", "detail"]
    all_lines = [header, *([str(c) for c in line] for line in lines)]
    widths = [max(len(line[i]) for line in all_lines) for i in range(len(header))]

    def render(line: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([render(header), rule, *(render(line) for line in all_lines[1:])])


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """Where and how the numbers were measured: recorded next to every result."""
    cuda = device is not None and device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32 if cuda else None,
    }


def describe_machine(m: Mapping[str, Any]) -> str:
    """One line naming the machine, for the header of a printed table."""
    where = m["device_name"] or f"{m['processor']}, {m['cpu_count']} CPU cores"
    return (f"{m['date']} | {m['device']} ({where}) | torch {m['torch']}, {m['torch_threads']} threads | "
            f"{m['command']}")


def parse_args(description: str, argv: Sequence[str] | None = None,
               add: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads for the whole run (default: torch's); recorded in the output")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed rounds per benchmark (default: by size); more on a noisy machine")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.json", help="write the results here")
    if add is not None:
        add(parser)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def add_settings_arguments(p: argparse.ArgumentParser, defaults: Any) -> None:
    """Every field of a benchmark's Settings dataclass as an option of its type (a list takes
    several values of its elements' type); --threads is common's own."""
    for key, value in dataclasses.asdict(defaults).items():
        if key == "threads":
            continue
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):  # a switch: type=bool would read any given word, "False" too, as True
            p.add_argument(flag, action="store_true", default=None)
        elif isinstance(value, list):
            p.add_argument(flag, nargs="+", type=type(value[0]) if value else str, default=None)
        else:
            p.add_argument(flag, type=type(value), default=None)


def settings_option(args: argparse.Namespace, defaults: Any) -> dict[str, Any]:
    """The `settings` argument of a benchmark's `run`: `defaults` (their `quick()` with --quick)
    with the options given on top."""
    s = defaults.quick() if args.quick else defaults
    fields = dataclasses.asdict(s)
    given = {k: v for k, v in vars(args).items() if k in fields and k != "threads" and v is not None}
    threads = {"threads": args.threads} if args.threads is not None else {}
    return {"settings": dataclasses.replace(s, **given, **threads)}


def run_arguments(run: Callable[..., Any], quick: bool, device: str, repeats: int | None) -> dict[str, Any]:
    """Keyword arguments for a benchmark's `run`: `device` and, with `repeats`, a Workload with
    that many rounds, each only where `run` takes it (others' benchmarks may take neither)."""
    params = inspect.signature(run).parameters
    kwargs: dict[str, Any] = {"quick": quick}
    if "device" in params:
        kwargs["device"] = device
    if repeats is not None and "w" in params:
        kwargs["w"] = dataclasses.replace(workload(quick, resolve_device(device)), repeats=repeats)
    return kwargs


def main(name: str, run: Callable[..., dict[str, Any]], description: str,
         add: Callable[[argparse.ArgumentParser], None] | None = None,
         options: Callable[[argparse.Namespace], dict[str, Any]] | None = None) -> None:
    """Standalone entry point of one benchmark: run it, print its table, write JSON if asked.
    `add` declares a benchmark's own options; `options` turns them into more arguments of `run`."""
    args = parse_args(description, add=add)
    try:
        device = resolve_device(args.device)
    except NasDoseError as e:
        sys.exit(f"error: {e}")
    extra = options(args) if options is not None else {}
    res = run(**run_arguments(run, args.quick, args.device, args.repeats), **extra)
    info = machine(device)
    print(describe_machine(info))
    print(format_table(table_rows(name, res)))
    for note in res.get("notes", []):
        print(f"note: {note}")
    if args.out is not None:
        save_json(args.out, {"machine": info, "quick": args.quick, "repeats": args.repeats,
                             "benchmarks": {name: res}})
        print(f"wrote {args.out}")


def clear_device_cache(device: torch.device) -> None:
    """Free cached CUDA blocks between benchmarks, so one's memory does not count for the next."""
    if device.type == "cuda":
        torch.cuda.empty_cache()

