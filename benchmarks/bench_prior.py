"""Does a stage-I dose prior (FDP's pretrained dose decoder) help here?

    python benchmarks/bench_prior.py [--quick] [--seeds 0 1 2] [--grid 32] [--epochs N] [--steps N]
        [--prior-epochs N] [--latent-weight W] [--freeze] [--out FILE.json]

Per seed, on the synthetic phantoms with preference plans of bench_preferences (the same data,
held-out phantoms and scoring), conditioned models (`model.conditioning: film`, `data.plans`)
trained by `nasdose train`:

- `unet3d`: the reference U-Net at `--widths`, `epochs` × `steps` (the other benchmarks' model);
- `latent, scratch`: `latent_dose_net` at `--widths` and `--latent`, the same budget;
- `latent, prior`: the same network, its decoder started from a dose autoencoder trained first
  on every training plan's dose for `--prior-epochs` (`train.prior.epochs`; `--freeze` keeps it
  fixed), then the same budget;
- `latent, prior + latent term`: as above, plus FDP's latent L1 term at `--latent-weight`;
- `latent, scratch, equal steps`: from scratch for `epochs + prior_epochs`: what the prior's
  steps buy if spent on the model itself (an autoencoder step costs about a model step).

Each is scored on the held-out phantoms (another data seed) against every plan at the plan's own
preferences (dose score, Gy) and for monotonicity of the spared OARs in the oar slider (ρ), as
bench_preferences scores them. A gain is paired by seed against `latent, scratch`. FDP reports a
gain from its stage I (MAE 2.63 -> 2.56 Gy, fewer boundary artifacts); whether a prior helps on
these data is what this measures. Not in the suite (minutes per seed).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from bench_preferences import evaluate, make_data, train_config

from nas_dose.inference import load_model_or_ensemble
from nas_dose.io import load_json
from nas_dose.models.conditioning import Conditioned
from nas_dose.models.factory import ModelConfig
from nas_dose.progress import set_quiet
from nas_dose.runtime import Runtime, RuntimeConfig, resolve_device
from nas_dose.train import Inputs
from nas_dose.train import run as nasdose_train
from nas_dose.training import PriorConfig

from common import Row, add_settings_arguments, mean_sd, result, settings_option
from common import main as bench_main


@dataclass
class Settings:
    """One measurement; the defaults take about a quarter of an hour per seed on one CPU thread."""

    patients: int = 20
    held_out: int = 6
    plans: int = 6
    grid: int = 32
    widths: list[int] = field(default_factory=lambda: [8, 16, 32])
    latent: int = 8
    epochs: int = 20
    steps: int = 30
    prior_epochs: int = 10
    latent_weight: float = 1.0
    freeze: bool = False
    batch: int = 2
    lr: float = 3e-3
    seeds: list[int] = field(default_factory=lambda: [0])
    data_seed: int = 0
    held_out_seed: int = 1000
    sweep: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    hi_sweep: list[float] = field(default_factory=lambda: [0.1, 0.15, 0.2, 0.25, 0.3])
    threads: int | None = 1

    def quick(self) -> Settings:
        """Seconds: a few 16³ phantoms, a tiny network, a few steps, one seed."""
        return replace(self, patients=4, held_out=2, plans=5, grid=16, widths=[4, 8], latent=4, epochs=1,
                       steps=3, prior_epochs=1)


SCRATCH = "latent, scratch"


def arms(s: Settings) -> dict[str, tuple[ModelConfig, int, PriorConfig]]:
    """Each compared model: its network, epochs and prior."""
    latent = ModelConfig(name="latent_dose_net", kwargs={"widths": list(s.widths), "latent": s.latent},
                         conditioning="film")
    unet = ModelConfig(kwargs={"widths": list(s.widths)}, conditioning="film")
    prior = PriorConfig(epochs=s.prior_epochs, freeze=s.freeze)
    return {"unet3d": (unet, s.epochs, PriorConfig()),
            SCRATCH: (latent, s.epochs, PriorConfig()),
            "latent, prior": (latent, s.epochs, prior),
            "latent, prior + latent term": (latent, s.epochs, replace(prior, latent_weight=s.latent_weight)),
            "latent, scratch, equal steps": (latent, s.epochs + s.prior_epochs, PriorConfig())}


def trained(s: Settings, data: Path, seed: int, device: str, arm: tuple[ModelConfig, int, PriorConfig],
            folder: Path) -> tuple[Conditioned, dict[str, Any]]:
    """One arm trained by `nasdose train` into `folder`: the model chosen on validation, and the
    validation reconstruction score of its prior (if any)."""
    model, epochs, prior = arm
    cfg = replace(train_config(s, seed, True, device), model=model, epochs=epochs, prior=prior)
    nasdose_train(cfg, Inputs(data), folder, official=False)
    net = load_model_or_ensemble(folder).eval()
    assert isinstance(net, Conditioned)
    info = {}
    if prior.epochs:
        info["prior_reconstruction_dose_score"] = load_json(folder / "prior" / "metrics.json")["best_val_dose_score"]
    return net, info


def run(quick: bool, device: str = "auto", settings: Settings | None = None) -> dict[str, Any]:
    """Benchmark entry point: every arm per seed, in a temporary folder."""
    dev = resolve_device(device)
    s = settings or (Settings().quick() if quick else Settings())
    print(f"dose prior: {budget(s)}; seeds {s.seeds}", flush=True)
    started = time.perf_counter()
    set_quiet(True)
    runtime = Runtime(RuntimeConfig(device=str(dev), threads=s.threads))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data, held = make_data(s, Path(tmp))
        for seed in s.seeds:
            record: dict[str, Any] = {"seed": seed}
            for name, arm in arms(s).items():
                t0 = time.perf_counter()
                net, info = trained(s, data, seed, str(dev), arm, Path(tmp) / f"{name}_{seed}")
                record[name] = {**evaluate(s, None, net, held, runtime), **info,
                                "seconds": round(time.perf_counter() - t0, 1)}
                r = record[name]
                print(f"  seed {seed}, {name}: dose score {r['conditioned_dose_score']:.3f} Gy, oar ρ "
                      f"{r['oar_rho']:.3f}; {r['seconds']:.0f} s", flush=True)
            runs.append(record)
    wall = time.perf_counter() - started

    def stat(name: str, key: str) -> tuple[float, float]:
        return mean_sd([r[name][key] for r in runs])

    def gain(name: str) -> list[float]:
        return [1 - r[name]["conditioned_dose_score"] / r[SCRATCH]["conditioned_dose_score"] for r in runs]

    rows = []
    for name in arms(s):
        detail = "mean ± sd {:.3f} ± {:.3f}; oar ρ {:.3f} ± {:.3f}".format(
            *stat(name, "conditioned_dose_score"), *stat(name, "oar_rho"))
        if name != SCRATCH:
            g = gain(name)
            detail += (f"; vs {SCRATCH}: {100 * statistics.fmean(g):+.1f} % ± {100 * mean_sd(g)[1]:.1f}, "
                       f"better in {sum(x > 0 for x in g)} of {len(g)} seeds")
        if "prior_reconstruction_dose_score" in runs[0][name]:
            detail += "; prior's reconstruction {:.3f} ± {:.3f} Gy".format(
                *stat(name, "prior_reconstruction_dose_score"))
        rows.append(Row(f"{name}: dose score vs the asked plan (Gy, {len(runs)} seeds)",
                        stat(name, "conditioned_dose_score")[0], detail=detail))
    return result("prior", dev, rows, measurements={"settings": asdict(s), "runs": runs, "wall_seconds": wall},
                  notes=[f"budget: {budget(s)}", f"wall time {wall / 60:.1f} min"])


def budget(s: Settings) -> str:
    return (f"widths {s.widths} (latent {s.latent}) at {s.grid}³; {s.patients} training phantoms, {s.held_out} "
            f"held-out (seed {s.held_out_seed}), {s.plans} plans each; {s.epochs}×{s.steps} steps (prior "
            f"{s.prior_epochs}×{s.steps}{', frozen' if s.freeze else ''}), batch {s.batch}, lr {s.lr}")


if __name__ == "__main__":
    bench_main("prior", run, __doc__.splitlines()[0], add=partial(add_settings_arguments, defaults=Settings()),
               options=partial(settings_option, defaults=Settings()))
