"""Does searching conditioned networks beat conditioning the pool of a plain search?

    python benchmarks/bench_conditioned_search.py [--quick] [--seeds 0 1 2] [--grid 16] [--budget N]
        [--supernet-steps N] [--epochs N] [--steps N] [--out FILE.json]

Per seed, on the synthetic phantoms with preference plans of bench_preferences (the same data,
held-out phantoms and scoring), two ways to a conditioned ensemble with one budget:

- `conditioned search`: `nasdose search conditioning=film` (evolution in the LENAS space, a
  conditioned supernet learning from the plans, every candidate scored on each plan at its own
  preferences), then `nasdose ensemble` of its pool (conditioned, trained on the plans);
- `plain search, pool conditioned`: the same search unconditioned (each patient's own dose),
  then `nasdose ensemble conditioning=film train.data.plans=true` of its pool.

Both ensembles (greedy selection, weighted) are scored on the held-out phantoms (another data
seed) against every plan at the plan's own preferences (dose score, Gy) and for monotonicity of
the spared OARs in the oar slider (ρ), as bench_preferences scores them. The difference is
paired by seed; `same pool` says whether both searches returned the same genotypes (then only
member training differs). Not in the suite (minutes per seed).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from bench_preferences import evaluate, make_data

from nas_dose.config import load_config
from nas_dose.ensemble import EnsembleConfig
from nas_dose.ensemble import Inputs as EnsembleInputs
from nas_dose.ensemble import run as nasdose_ensemble
from nas_dose.inference import load_model_or_ensemble
from nas_dose.pool import load_pool
from nas_dose.progress import set_quiet
from nas_dose.runtime import Runtime, RuntimeConfig, resolve_device
from nas_dose.strategies.search import Inputs as SearchInputs
from nas_dose.strategies.search import SearchConfig
from nas_dose.strategies.search import run as nasdose_search

from common import Row, add_settings_arguments, mean_sd, result, settings_option
from common import main as bench_main

ARMS = ("conditioned search", "plain search, pool conditioned")


@dataclass
class Settings:
    """One measurement; the defaults take about ten minutes per seed on one CPU thread."""

    patients: int = 20
    held_out: int = 6
    plans: int = 6
    grid: int = 16
    stem: int = 4
    widths: list[int] = field(default_factory=lambda: [8, 16])
    budget: int = 12
    supernet_steps: int = 600
    pool_size: int = 3
    epochs: int = 20
    steps: int = 30
    lr: float = 3e-3
    seeds: list[int] = field(default_factory=lambda: [0])
    data_seed: int = 0
    held_out_seed: int = 1000
    sweep: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    hi_sweep: list[float] = field(default_factory=lambda: [0.1, 0.15, 0.2, 0.25, 0.3])
    threads: int | None = 1

    def quick(self) -> Settings:
        """Seconds: a few 16³ phantoms, a tiny macro, a few steps, one seed."""
        return replace(self, patients=6, held_out=2, plans=3, stem=2, widths=[4, 8], budget=3, supernet_steps=4,
                       pool_size=3, epochs=1, steps=2)


def _runtime(s: Settings, device: str) -> list[str]:
    return [f"runtime.device={device}", *([f"runtime.threads={s.threads}"] if s.threads else [])]


def search_config(s: Settings, seed: int, device: str, conditioned: bool) -> SearchConfig:
    return load_config(SearchConfig, "search_evolution", overrides=[
        f"macro.stem={s.stem}", f"macro.widths={s.widths}", f"options.budget={s.budget}",
        f"options.population={max(2, s.budget // 2)}", f"options.sample={max(2, s.budget // 4)}",
        f"options.evaluator.supernet_steps={s.supernet_steps}", f"pool_size={s.pool_size}", f"seed={seed}",
        *(["conditioning=film"] if conditioned else []), *_runtime(s, device)])


def ensemble_config(s: Settings, seed: int, device: str, condition_pool: bool) -> EnsembleConfig:
    return load_config(EnsembleConfig, "ensemble", overrides=[
        f"train.epochs={s.epochs}", f"train.steps_per_epoch={s.steps}", f"train.optim.lr={s.lr}",
        "train.data.augment.enabled=false", "plots=0", f"seed={seed}",
        *(["conditioning=film", "train.data.plans=true"] if condition_pool else []), *_runtime(s, device)])


def run(quick: bool, device: str = "auto", settings: Settings | None = None) -> dict[str, Any]:
    """Benchmark entry point: both arms per seed, in a temporary folder."""
    dev = resolve_device(device)
    s = settings or (Settings().quick() if quick else Settings())
    print(f"conditioned search: {budget(s)}; seeds {s.seeds}", flush=True)
    started = time.perf_counter()
    set_quiet(True)
    runtime = Runtime(RuntimeConfig(device=str(dev), threads=s.threads))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data, held = make_data(s, Path(tmp))
        for seed in s.seeds:
            record: dict[str, Any] = {"seed": seed}
            pools = []
            for name, conditioned in zip(ARMS, (True, False)):
                t0 = time.perf_counter()
                folder = Path(tmp) / f"{'cond' if conditioned else 'plain'}_{seed}"
                nasdose_search(search_config(s, seed, str(dev), conditioned), SearchInputs(data), folder / "search")
                pool = load_pool(folder / "search" / "pool.yaml")
                pools.append(sorted(m.genotype.key() for m in pool.members))
                nasdose_ensemble(ensemble_config(s, seed, str(dev), not conditioned),
                                 EnsembleInputs(folder / "search" / "pool.yaml", data), folder / "ensemble")
                ensemble = load_model_or_ensemble(folder / "ensemble" / "ensemble.yaml").eval()
                record[name] = {**evaluate(s, None, ensemble, held, runtime),
                                "seconds": round(time.perf_counter() - t0, 1)}
                r = record[name]
                print(f"  seed {seed}, {name}: dose score {r['conditioned_dose_score']:.3f} Gy, oar ρ "
                      f"{r['oar_rho']:.3f}; {r['seconds']:.0f} s", flush=True)
            record["same_pool"] = pools[0] == pools[1]
            runs.append(record)
    wall = time.perf_counter() - started

    def stat(name: str, key: str) -> tuple[float, float]:
        return mean_sd([r[name][key] for r in runs])

    gain = [1 - r[ARMS[0]]["conditioned_dose_score"] / r[ARMS[1]]["conditioned_dose_score"] for r in runs]
    rows = [Row(f"{name}: ensemble's dose score vs the asked plan (Gy, {len(runs)} seeds)",
                stat(name, "conditioned_dose_score")[0],
                detail="mean ± sd {:.3f} ± {:.3f}; oar ρ {:.3f} ± {:.3f}".format(
                    *stat(name, "conditioned_dose_score"), *stat(name, "oar_rho"))) for name in ARMS]
    rows.append(Row("conditioned search's gain over conditioning a plain pool", statistics.fmean(gain),
                    detail=f"mean ± sd {statistics.fmean(gain):+.3f} ± {mean_sd(gain)[1]:.3f}, paired by seed; "
                           f"better in {sum(g > 0 for g in gain)} of {len(gain)} seeds; same pool in "
                           f"{sum(r['same_pool'] for r in runs)}"))
    return result("conditioned_search", dev, rows,
                  measurements={"settings": asdict(s), "runs": runs, "wall_seconds": wall},
                  notes=[f"budget: {budget(s)}", f"wall time {wall / 60:.1f} min"])


def budget(s: Settings) -> str:
    return (f"LENAS stem {s.stem}, widths {s.widths} at {s.grid}³; {s.patients} training phantoms, {s.held_out} "
            f"held-out (seed {s.held_out_seed}), {s.plans} plans each; evolution budget {s.budget}, supernet "
            f"{s.supernet_steps} steps, pool {s.pool_size}; members {s.epochs}×{s.steps} steps, lr {s.lr}")


if __name__ == "__main__":
    bench_main("conditioned_search", run, __doc__.splitlines()[0],
               add=partial(add_settings_arguments, defaults=Settings()),
               options=partial(settings_option, defaults=Settings()))
