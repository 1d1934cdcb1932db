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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from bench_preferences import HeldOutPlans, arm_stat, paired_gain, score_arms
from torch import nn

from nas_dose.config import load_config
from nas_dose.ensemble import EnsembleConfig
from nas_dose.ensemble import Inputs as EnsembleInputs
from nas_dose.ensemble import run as nasdose_ensemble
from nas_dose.inference import load_model_or_ensemble
from nas_dose.pool import load_pool
from nas_dose.runtime import resolve_device
from nas_dose.strategies.search import Inputs as SearchInputs
from nas_dose.strategies.search import SearchConfig
from nas_dose.strategies.search import run as nasdose_search

from common import Row, add_settings_arguments, result, settings_option
from common import main as bench_main

ARMS = ("conditioned search", "plain search, pool conditioned")


@dataclass
class Settings(HeldOutPlans):
    """One measurement; the defaults take about ten minutes per seed on one CPU thread."""

    grid: int = 16
    stem: int = 4
    widths: list[int] = field(default_factory=lambda: [8, 16])
    budget: int = 12
    supernet_steps: int = 600
    pool_size: int = 3
    epochs: int = 20
    steps: int = 30
    lr: float = 3e-3

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


def ensembles(s: Settings, device: str, seed: int, data: Path, tmp: Path) -> Iterator[tuple[str, nn.Module, dict]]:
    """Each arm's search and ensemble: the ensemble, and its pool's genotypes."""
    for name, conditioned in zip(ARMS, (True, False)):
        folder = tmp / f"{'cond' if conditioned else 'plain'}_{seed}"
        nasdose_search(search_config(s, seed, device, conditioned), SearchInputs(data), folder / "search")
        pool = sorted(m.genotype.key() for m in load_pool(folder / "search" / "pool.yaml").members)
        nasdose_ensemble(ensemble_config(s, seed, device, not conditioned),
                         EnsembleInputs(folder / "search" / "pool.yaml", data), folder / "ensemble")
        yield name, load_model_or_ensemble(folder / "ensemble" / "ensemble.yaml").eval(), {"pool": pool}


def run(quick: bool, device: str = "auto", settings: Settings | None = None) -> dict[str, Any]:
    """Benchmark entry point: both arms per seed, in a temporary folder."""
    dev = resolve_device(device)
    s = settings or (Settings().quick() if quick else Settings())
    print(f"conditioned search: {budget(s)}; seeds {s.seeds}", flush=True)
    runs, wall = score_arms(s, dev, partial(ensembles, s, str(dev)))
    for r in runs:
        r["same_pool"] = r[ARMS[0]]["pool"] == r[ARMS[1]]["pool"]
    rows = [Row(f"{name}: ensemble's dose score vs the asked plan (Gy, {len(runs)} seeds)",
                arm_stat(runs, name, "conditioned_dose_score")[0],
                detail="mean ± sd {:.3f} ± {:.3f}; oar ρ {:.3f} ± {:.3f}".format(
                    *arm_stat(runs, name, "conditioned_dose_score"), *arm_stat(runs, name, "oar_rho")))
            for name in ARMS]
    rows.append(Row("conditioned search's gain over conditioning a plain pool",
                    statistics.fmean(1 - r[ARMS[0]]["conditioned_dose_score"] / r[ARMS[1]]["conditioned_dose_score"]
                                     for r in runs),
                    detail=f"{paired_gain(runs, ARMS[0], ARMS[1])}; same pool in {sum(r['same_pool'] for r in runs)}"))
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
