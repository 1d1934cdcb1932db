"""What starting pool members from their inherited supernet weights saves (`nasdose ensemble
init=inherit`) against training them from scratch (`init=scratch`, the default).

    python benchmarks/bench_inherit.py [--quick] [--members 2] [--epochs N] [--steps N] [--out FILE.json]

On a fresh synthetic data set (`nas_dose.data.synth`, in a temporary folder):

1. `nasdose search`'s own run (random strategy, diversity off, evaluator mode inherit) scores
   `--budget` genotypes on an SPOS supernet of `--supernet-steps` steps, writes the pool of the
   `--members` best and the supernet file (DIR/supernet.pt);
2. each member is trained twice by `nas_dose.training.train_model` with the same budget, seed
   and batch order (`--epochs` × `--steps`, batch 1, no augmentation, the search's lr): from a
   seeded random initialization (scratch), and from its weights in the supernet file
   (`strategies.evaluator.inherited_weights`, as `nasdose ensemble init=inherit` starts it);
   the validation dose score (Gy, data set grid) is taken after every epoch;
3. a third arm for what the supernet itself cost: from scratch, with the supernet's steps on
   top of the budget (rounded up to whole epochs), so that it has had as many steps as the
   inherited network's weights have seen.

Rows, means over the members, the arms measured side by side in one run: the best validation
dose score after the budget, inherited ÷ scratch (< 1: inheriting is better at equal steps);
the steps inheriting needs to reach the score scratch reaches with the whole budget, ÷ that
budget (< 1: steps saved; a member that never reaches it counts as the whole budget); and the
inherited best ÷ the best of scratch given the supernet's steps too (< 1: inheriting beats
spending the supernet's steps on the member itself; the supernet's steps are paid once by the
search, for every member it scores, so this is the harshest comparison).
Not in the suite (the default size takes about 7 minutes on a CPU); `run(quick)` is its entry point.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from nas_dose.data import synth
from nas_dose.data.augment import AugmentConfig
from nas_dose.pool import DiversityConfig
from nas_dose.progress import set_quiet
from nas_dose.runtime import RuntimeConfig, resolve_device, seed_everything
from nas_dose.search_spaces import Genotype, get_space
from nas_dose.strategies import search
from nas_dose.strategies.evaluator import SUPERNET_FILE, inherited_weights
from nas_dose.training import DataConfig, OptimConfig, TrainConfig, train_model

from common import Row, add_settings_arguments, result, settings_option
from common import main as bench_main

ARMS = ("scratch", "inherit", "scratch_long")


@dataclass
class Settings:
    """What one measurement runs; the defaults fit about 7 minutes on one CPU thread at 16³."""

    patients: int = 16
    grid: int = 16
    data_seed: int = 0
    space: str = "lenas"
    stem: int = 4
    widths: list[int] = field(default_factory=lambda: [8, 16])
    budget: int = 6  # genotypes the search scores
    supernet_steps: int = 400
    members: int = 3
    epochs: int = 8
    steps: int = 25  # per epoch
    lr: float = 1e-3
    seed: int = 0  # the search's, and (+ member index) each training's
    threads: int | None = 1

    def quick(self) -> Settings:
        """A few minutes: 10 patients, 2 members, a short supernet and fine-tuning."""
        return replace(self, patients=10, budget=3, supernet_steps=120, members=2, epochs=5, steps=12)


def searched_pool(s: Settings, data: Path, out: Path, device: str) -> list[Genotype]:
    """The members' genotypes of a `nasdose search` into `out` (which also gets supernet.pt)."""
    cfg = search.SearchConfig(space=s.space, macro={"stem": s.stem, "widths": list(s.widths)}, strategy="random",
                              options={"budget": s.budget, "evaluator": {"supernet_steps": s.supernet_steps,
                                                                         "batch_size": 1, "lr": s.lr}},
                              pool_size=s.members, diversity=DiversityConfig(mode="none"), seed=s.seed,
                              runtime=RuntimeConfig(device=device, threads=s.threads))
    return [m.genotype for m in search.run(cfg, search.Inputs(data), out).members]


def long_epochs(s: Settings) -> int:
    """The scratch_long arm's epochs: the budget's and the supernet's steps, in whole epochs."""
    return s.epochs + -(-s.supernet_steps // s.steps)


def curve(s: Settings, g: Genotype, index: int, data: Path, supernet: Path | None, device: str, epochs: int
          ) -> list[tuple[int, float]]:
    """(steps, validation dose score) after each epoch of `g`'s training for `epochs`, from
    `supernet`'s weights for it or (None) from scratch; the same seed and batches either way."""
    cfg = TrainConfig(epochs=epochs, steps_per_epoch=s.steps, seed=s.seed + index,
                      data=DataConfig(batch_size=1, augment=AugmentConfig(enabled=False)),
                      optim=OptimConfig(lr=s.lr), runtime=RuntimeConfig(device=device, threads=s.threads))
    seed_everything(cfg.seed)
    net = get_space(g.space).build(g)
    if supernet is not None:
        net.load_state_dict(inherited_weights(supernet, g))
    history = train_model(net, cfg, data).history
    return [(e["step"], e["val_dose_score"]) for e in history if e["val_dose_score"] is not None]


def steps_to_reach(points: list[tuple[int, float]], score: float) -> int | None:
    """The first step whose best-so-far validation score is at most `score` (None: never)."""
    best = float("inf")
    for step, value in points:
        best = min(best, value)
        if best <= score:
            return step
    return None


def measure(s: Settings, workdir: Path, device: str) -> list[dict[str, Any]]:
    """One record per member: both arms' curves, measured one after the other."""
    set_quiet(True)
    data = workdir / "synth.h5"
    synth.run(synth.Config(patients=s.patients, grid=s.grid, seed=s.data_seed), synth.Inputs(), data)
    started = time.perf_counter()
    genotypes = searched_pool(s, data, workdir / "search", device)
    search_seconds = time.perf_counter() - started
    supernet = workdir / "search" / SUPERNET_FILE
    records = []
    for i, g in enumerate(genotypes):
        curves, seconds = {}, {}
        for arm in ARMS if i % 2 == 0 else ARMS[::-1]:  # alternate the order
            started = time.perf_counter()
            curves[arm] = curve(s, g, i, data, supernet if arm == "inherit" else None, device,
                                long_epochs(s) if arm == "scratch_long" else s.epochs)
            seconds[arm] = time.perf_counter() - started
        best = {arm: min(v for _, v in points) for arm, points in curves.items()}
        reach = steps_to_reach(curves["inherit"], best["scratch"])
        records.append({"member": i, "genotype": g.to_dict(), "curves": curves, "best": best,
                        "inherit_steps_to_scratch_best": reach, "seconds": seconds,
                        "search_seconds": round(search_seconds, 2)})
        print(f"  member {i}: best validation {best['scratch']:.3f} Gy scratch, {best['inherit']:.3f} Gy inherited, "
              f"{best['scratch_long']:.3f} Gy scratch with the supernet's steps too; inherited reaches scratch's "
              "best " + (f"at step {reach}" if reach is not None else "never"), flush=True)
    return records


def budget(s: Settings) -> str:
    return (f"{s.members} members of {s.space} (stem {s.stem}, widths {s.widths}) at {s.grid}³, {s.patients} "
            f"synthetic patients; search: random, {s.budget} genotypes, {s.supernet_steps} supernet steps; "
            f"training: {s.epochs}×{s.steps} steps (scratch_long: {long_epochs(s)}×{s.steps}), batch 1, lr {s.lr:g}")


def run(quick: bool, device: str = "auto", settings: Settings | None = None) -> dict[str, Any]:
    """Benchmark entry point: the measurement at `quick` size (or `settings`) in a temporary folder."""
    dev = resolve_device(device)
    s = settings or (Settings().quick() if quick else Settings())
    print(f"inherit vs scratch: {budget(s)}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        records = measure(s, Path(tmp), str(dev))
    total = s.epochs * s.steps
    ratio = statistics.fmean(r["best"]["inherit"] / r["best"]["scratch"] for r in records)
    needed = [r["inherit_steps_to_scratch_best"] for r in records]
    fraction = statistics.fmean((n if n is not None else total) / total for n in needed)
    rows = [Row(f"best validation dose score after {total} steps, inherited ÷ scratch (mean of {len(records)})",
                ratio, high=1.0, detail=", ".join(f"{r['best']['inherit']:.3f} vs {r['best']['scratch']:.3f} Gy"
                                                  for r in records)),
            Row("steps for inherited to reach scratch's best ÷ scratch's steps", fraction, high=1.0,
                detail=", ".join(f"{n} of {total}" if n is not None else "never" for n in needed)),
            Row(f"best validation, inherited ÷ scratch after {long_epochs(s) * s.steps} steps (budget + supernet's)",
                statistics.fmean(r["best"]["inherit"] / r["best"]["scratch_long"] for r in records), high=1.0,
                detail=", ".join(f"{r['best']['inherit']:.3f} vs {r['best']['scratch_long']:.3f} Gy" for r in records))]
    wall = time.perf_counter() - started
    return result("inherit", dev, rows, measurements={"settings": asdict(s), "members": records,
                                                       "wall_seconds": wall},
                  notes=[f"budget: {budget(s)}", "< 1: inheriting pays (a better score at equal steps; steps "
                         "saved; better than spending the supernet's steps on the member from scratch)",
                         f"wall time {wall / 60:.1f} min"])


if __name__ == "__main__":
    bench_main("inherit", run, __doc__.splitlines()[0],
               add=partial(add_settings_arguments, defaults=Settings()),
               options=partial(settings_option, defaults=Settings()))
