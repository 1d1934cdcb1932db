"""Every search strategy against random search on the same budget, over several seeds.

    python benchmarks/compare_strategies.py [--quick] [--data DATA.h5] [--workdir DIR] [--out FILE.json]

The budget is the same for all: `--supernet-steps` weight-training steps of a supernet on the
weight patients and `--candidates` genotypes scored on the architecture patients. The
differentiable search spends the steps as first-order DARTS (each also updating α) and scores
its `candidates` most probable genotypes; evolution, random search and NNI's TPE and
RegularizedEvolution train an SPOS supernet for the same steps ("inherit" evaluator) and
score `candidates` genotypes. Diversity is off: this compares accuracy only.

The yardstick is the same for every strategy: the best genotype found is trained from
scratch with identical settings (`nas_dose.training.train_model`, same seed, same steps) on
the training split and scored on the validation split (dose score, Gy; lower is better).
Without `--data`, a synthetic data set is made in the work folder (with `--data`, e.g. the
OpenKBP patients imported at 32³, the yardstick is the official score on the source grid).

`unet3d` among the strategies is the hand-designed reference: nasdose's 3D U-Net with widths
b, 2b, 4b, ... (one level more than the macro's widths, the stem's level) and the widest b
whose FLOPs do not exceed those of the `--reference` strategy's best genotype of the same
seed, put to the same yardstick. Prints each run, then mean ± std per strategy, the paired
(same seed) difference to random search and, with `unet3d`, the paired relative difference to
the hand-designed U-Net (negative: the searched network is better).
In the benchmark suite (`run`), the rows are those paired differences.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nas_dose.data.dataset import IN_CHANNELS
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.io import save_json
from nas_dose.models.factory import ModelConfig, build_model
from nas_dose.pool import DiversityConfig
from nas_dose.progress import set_quiet
from nas_dose.runtime import Runtime, RuntimeConfig, resolve_device, seed_everything
from nas_dose.search_spaces import Genotype, get_space
from nas_dose.search_spaces.measure import count_flops
from nas_dose.strategies import SearchContext, get_strategy
from nas_dose.strategies.search import SplitConfig, split_patients

from common import Row, result, trained_score

STRATEGIES = ("differentiable", "evolution", "random", "nni-tpe", "nni-evolution", "unet3d")


@dataclass
class Settings:
    """What the comparison runs; the defaults are the full size, `quick()` a few minutes on 2 cores."""

    patients: int = 24
    grid: int = 32
    space: str = "lenas"
    stem: int = 8
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    seeds: int = 3
    supernet_steps: int = 300
    candidates: int = 20
    final_epochs: int = 20
    final_steps: int = 20
    reference: str = "differentiable"  # whose best genotype's FLOPs bound the hand-designed U-Net
    threads: int | None = 1  # small volumes run fastest on one thread

    def quick(self) -> Settings:
        return replace(self, patients=16, grid=16, stem=4, widths=[8, 16], seeds=2, supernet_steps=40,
                       candidates=8, final_epochs=4, final_steps=15)


def options(name: str, s: Settings) -> tuple[str, dict[str, Any]]:
    """The registered strategy and its options for `name`, all on the same budget."""
    evaluator = {"mode": "inherit", "supernet_steps": s.supernet_steps, "batch_size": 1, "lr": 1e-3}
    population = max(2, s.candidates // 3)
    sample = min(population, max(2, population // 2))  # a tournament of one would select nothing
    if name == "differentiable":
        epochs = min(s.supernet_steps, 4)
        return "differentiable", {"mode": "softmax", "epochs": epochs, "steps_per_epoch": s.supernet_steps // epochs,
                                  "candidates": s.candidates, "track_score": False}
    if name == "evolution":
        return "evolution", {"budget": s.candidates, "population": population, "sample": sample,
                             "evaluator": evaluator}
    if name == "random":
        return "random", {"budget": s.candidates, "evaluator": evaluator}
    return "nni", {"algorithm": name.split("-", 1)[1], "budget": s.candidates, "population": population,
                   "sample": sample, "evaluator": evaluator}


def yardstick(g: Genotype, data: Path, s: Settings, device: str) -> float:
    """Validation dose score (Gy) of `g` trained from scratch, identically for every strategy
    (official, on the source grid, for a resampled data set)."""
    return trained_score(partial(get_space(g.space).build, g), data, s.final_epochs, s.final_steps, 1000, 1e-3,
                         device, s.threads)


def run_one(name: str, seed: int, data: Path, s: Settings, device: str) -> dict[str, Any]:
    """Search with strategy `name` and seed `seed`, then put its best genotype to the yardstick."""
    space = get_space(s.space)
    macro = space.check_macro({"stem": s.stem, "widths": list(s.widths)})
    weight, arch, diversity = split_patients(data, SplitConfig(), seed)
    ctx = SearchContext(space, macro, data, Runtime(RuntimeConfig(device=device, threads=s.threads)), seed,
                        weight, arch, diversity, diversity=DiversityConfig(mode="none"))
    registered, opts = options(name, s)
    seed_everything(seed)
    started = time.perf_counter()
    cands = get_strategy(registered).from_options(opts).run(ctx)
    search_s = time.perf_counter() - started
    best = cands[0]
    return {"strategy": name, "seed": seed, "search_seconds": round(search_s, 2), "candidates": len(cands),
            "search_score": best.score, "final_score": yardstick(best.genotype, data, s, device),
            "genotype": best.genotype.to_dict()}


def genotype_flops(g: Genotype, grid: int) -> int:
    return count_flops(get_space(g.space).build(g), (1, IN_CHANNELS, grid, grid, grid))


def unet3d_of(widths: list[int]) -> nn.Module:
    return build_model(ModelConfig(name="unet3d", kwargs={"widths": widths}))


def hand_designed(flops: float, depth: int, grid: int) -> tuple[nn.Module, list[int]]:
    """The widest reference U-Net (widths b, 2b, 4b, ... over `depth` levels) within `flops`."""
    chosen = None
    for base in range(1, 129):
        widths = [base * 2 ** i for i in range(depth)]
        model = unet3d_of(widths)
        if count_flops(model, (1, IN_CHANNELS, grid, grid, grid)) > flops:
            break
        chosen = model, widths
    if chosen is None:
        raise ValueError(f"no U-Net of {depth} levels fits in {flops:.3g} FLOPs")
    return chosen


def run_unet3d(seed: int, searched: dict[str, Any], data: Path, s: Settings, device: str) -> dict[str, Any]:
    """The hand-designed U-Net of no more FLOPs than `searched`'s best genotype, to the same yardstick."""
    with open_data(data) as d:
        grid = d.grid
    budget = genotype_flops(Genotype(**searched["genotype"]), grid)
    model, widths = hand_designed(budget, len(s.widths) + 1, grid)
    flops = count_flops(model, (1, IN_CHANNELS, grid, grid, grid))
    return {"strategy": "unet3d", "seed": seed, "search_seconds": 0.0, "candidates": 0, "search_score": math.nan,
            "final_score": trained_score(partial(unet3d_of, widths), data, s.final_epochs, s.final_steps, 1000, 1e-3,
                                         device, s.threads),
            "widths": widths, "flops": flops, "flops_bound": budget}


def compare(s: Settings, data: Path | None, workdir: Path, device: str) -> tuple[list[dict[str, Any]], list[dict]]:
    """Every run (printed as it ends) and the summary rows; a synthetic data set in `workdir` if no `data`."""
    set_quiet(True)
    if data is None:
        data = workdir / f"synth_{s.patients}_g{s.grid}.h5"
        if not data.exists():
            write_dataset(data, synth_patients(s.patients, s.grid, 0), source="synth", grid=s.grid, total=s.patients)
    print(f"data {data}; space {s.space}, stem {s.stem}, widths {s.widths}; budget: {s.supernet_steps} supernet "
          f"steps, {s.candidates} candidates; {s.seeds} seeds; yardstick: {s.final_epochs}×{s.final_steps} "
          "training steps from scratch", flush=True)
    runs = []
    for seed in range(s.seeds):
        for name in s.strategies:
            if name == "unet3d":
                (searched,) = [r for r in runs if r["seed"] == seed and r["strategy"] == s.reference]
                r = run_unet3d(seed, searched, data, s, device)
            else:
                r = run_one(name, seed, data, s, device)
            runs.append(r)
            print(f"  seed {seed} {name:<15} search {r['search_seconds']:7.1f} s  search score "
                  f"{r['search_score']:.3f}  final {r['final_score']:.3f} Gy", flush=True)
    return runs, summarize(runs, s.strategies)


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Mean ± std per strategy, and the paired (same seed) difference to random search."""
    random_final = {r["seed"]: r["final_score"] for r in runs if r["strategy"] == "random"}
    unet_final = {r["seed"]: r["final_score"] for r in runs if r["strategy"] == "unet3d"}
    rows = []
    for name in names:
        mine = [r for r in runs if r["strategy"] == name]
        delta = [r["final_score"] - random_final[r["seed"]] for r in mine if r["seed"] in random_final]
        relative = [100 * (r["final_score"] / unet_final[r["seed"]] - 1) for r in mine if r["seed"] in unet_final]
        rows.append({"strategy": name, "runs": len(mine),
                     "search_s": float(np.mean([r["search_seconds"] for r in mine])),
                     "search": _mean_std([r["search_score"] for r in mine]),
                     "final": _mean_std([r["final_score"] for r in mine]),
                     "vs_random": _mean_std(delta) if delta and name != "random" else None,
                     "vs_unet3d_percent": _mean_std(relative) if relative and name != "unet3d" else None,
                     "beats_random": sum(d < 0 for d in delta) if name != "random" else None})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'strategy':<15}{'runs':>5}{'search s':>10}{'search score Gy':>19}{'final score Gy':>19}"
          f"{'final − random':>18}{'seeds better':>14}{'vs unet3d %':>18}")
    for r in rows:
        vs = "-" if r["vs_random"] is None else "{:+.3f} ± {:.3f}".format(*r["vs_random"])
        better = "-" if r["beats_random"] is None else f"{r['beats_random']}/{r['runs']}"
        unet = "-" if r["vs_unet3d_percent"] is None else "{:+.1f} ± {:.1f}".format(*r["vs_unet3d_percent"])
        print(f"{r['strategy']:<15}{r['runs']:>5}{r['search_s']:>10.1f}"
              f"{r['search'][0]:>11.3f} ± {r['search'][1]:.3f}{r['final'][0]:>11.3f} ± {r['final'][1]:.3f}{vs:>18}"
              f"{better:>14}{unet:>18}")


def run(quick: bool, device: str = "auto") -> dict[str, Any]:
    """Benchmark-suite entry point: the comparison at `quick` size on a temporary synthetic data set."""
    dev = resolve_device(device)
    s = Settings().quick() if quick else Settings()
    with tempfile.TemporaryDirectory() as tmp:
        runs, summary = compare(s, None, Path(tmp), str(dev))
    rows = [Row(f"final score {r['strategy']} − random (Gy, paired, {r['runs']} seeds)", r["vs_random"][0],
                detail="mean ± std {:+.3f} ± {:.3f}; final {:.3f} Gy".format(*r["vs_random"], r["final"][0]))
            for r in summary if r["vs_random"] is not None]
    return result("strategies", dev, rows, measurements={"settings": asdict(s), "summary": summary, "runs": runs},
                  notes=[("negative: the strategy's best genotype trains to a better validation score than "
                          "random search's on the same budget")])


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    p.add_argument("--data", type=Path, help="nasdose data set (default: synthetic, made in --workdir)")
    p.add_argument("--workdir", type=Path, default=Path("compare_strategies"), help="for the synthetic data set")
    p.add_argument("--out", type=Path, help="write every run and the summary here (JSON)")
    p.add_argument("--device", default="cpu")
    for key, value in asdict(defaults).items():
        if isinstance(value, list):
            p.add_argument(f"--{key.replace('_', '-')}", nargs="+", type=type(value[0]), default=None)
        else:
            p.add_argument(f"--{key.replace('_', '-')}", type=int if key == "threads" else type(value), default=None)
    args = p.parse_args(argv)
    s = defaults.quick() if args.quick else defaults
    s = replace(s, **{k: v for k, v in vars(args).items() if k in asdict(defaults) and v is not None})
    unknown = sorted(set(s.strategies) - set(STRATEGIES))
    if unknown:
        p.error(f"unknown strategies {unknown} (known: {', '.join(STRATEGIES)})")
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs, summary = compare(s, args.data, args.workdir, args.device)
    print_table(summary)
    if args.out is not None:
        save_json(args.out, {"settings": asdict(s), "summary": summary, "runs": runs})
        print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
