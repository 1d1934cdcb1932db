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

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from bench_preferences import HeldOutPlans, arm_stat, paired_gain, score_arms, train_config
from torch import nn

from nas_dose.inference import load_model_or_ensemble
from nas_dose.io import load_json
from nas_dose.models.factory import ModelConfig
from nas_dose.runtime import resolve_device
from nas_dose.train import Inputs
from nas_dose.train import run as nasdose_train
from nas_dose.training import PriorConfig

from common import Row, add_settings_arguments, result, settings_option
from common import main as bench_main


@dataclass
class Settings(HeldOutPlans):
    """One measurement; the defaults take about a quarter of an hour per seed on one CPU thread."""

    widths: list[int] = field(default_factory=lambda: [8, 16, 32])
    latent: int = 8
    epochs: int = 20
    steps: int = 30
    prior_epochs: int = 10
    latent_weight: float = 1.0
    freeze: bool = False
    batch: int = 2
    lr: float = 3e-3

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


def trained(s: Settings, device: str, seed: int, data: Path, tmp: Path) -> Iterator[tuple[str, nn.Module, dict]]:
    """Each arm trained by `nasdose train`: the model chosen on validation and, for a prior, the
    validation reconstruction score of its stage I."""
    for name, (model, epochs, prior) in arms(s).items():
        folder = tmp / f"{name}_{seed}"
        cfg = replace(train_config(s, seed, True, device), model=model, epochs=epochs, prior=prior)
        nasdose_train(cfg, Inputs(data), folder, official=False)
        info = ({"prior_reconstruction_dose_score": load_json(folder / "prior" / "metrics.json")["best_val_dose_score"]}
                if prior.epochs else {})
        yield name, load_model_or_ensemble(folder).eval(), info


def run(quick: bool, device: str = "auto", settings: Settings | None = None) -> dict[str, Any]:
    """Benchmark entry point: every arm per seed, in a temporary folder."""
    dev = resolve_device(device)
    s = settings or (Settings().quick() if quick else Settings())
    print(f"dose prior: {budget(s)}; seeds {s.seeds}", flush=True)
    runs, wall = score_arms(s, dev, partial(trained, s, str(dev)))
    rows = []
    for name in arms(s):
        detail = "mean ± sd {:.3f} ± {:.3f}; oar ρ {:.3f} ± {:.3f}".format(
            *arm_stat(runs, name, "conditioned_dose_score"), *arm_stat(runs, name, "oar_rho"))
        if name != SCRATCH:
            detail += "; " + paired_gain(runs, name, SCRATCH)
        if "prior_reconstruction_dose_score" in runs[0][name]:
            detail += "; prior's reconstruction {:.3f} ± {:.3f} Gy".format(
                *arm_stat(runs, name, "prior_reconstruction_dose_score"))
        rows.append(Row(f"{name}: dose score vs the asked plan (Gy, {len(runs)} seeds)",
                        arm_stat(runs, name, "conditioned_dose_score")[0], detail=detail))
    return result("prior", dev, rows, measurements={"settings": asdict(s), "runs": runs, "wall_seconds": wall},
                  notes=[f"budget: {budget(s)}", f"wall time {wall / 60:.1f} min"])


def budget(s: Settings) -> str:
    return (f"widths {s.widths} (latent {s.latent}) at {s.grid}³; {s.patients} training phantoms, {s.held_out} "
            f"held-out (seed {s.held_out_seed}), {s.plans} plans each; {s.epochs}×{s.steps} steps (prior "
            f"{s.prior_epochs}×{s.steps}{', frozen' if s.freeze else ''}), batch {s.batch}, lr {s.lr}")


if __name__ == "__main__":
    bench_main("prior", run, __doc__.splitlines()[0], add=partial(add_settings_arguments, defaults=Settings()),
               options=partial(settings_option, defaults=Settings()))
