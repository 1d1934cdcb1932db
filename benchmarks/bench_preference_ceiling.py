"""How much better can a conditioned model be than a plain one on the preference phantoms, at most?

    python benchmarks/bench_preference_ceiling.py [--quick] [--grid 16] [--patients 6] [--draws 16]
        [--out FILE.json]

No network is trained: the question is about the data. Each phantom (bench_preferences's
held-out set: data seed 1000) is planned again with `--draws` draws of the plan parameters that
`nasdose data synth` keeps hidden from a model (beam number and angles, margin, penumbra, tail,
scatter, modulation; the dose-grid extent is kept, as the possible-dose mask shows it), each at
the phantom's `--plans` preference settings. Under the dose score (mean absolute error in the
mask) the best prediction of what a model cannot tell apart is the per-voxel median; the
settings are the phantom's own (as `--preferences K` draws them), so:

- plain floor: each dose against the median over every draw and setting (the model knows the
  anatomy only);
- conditioned floor: each dose against the median over the draws at its setting (the model
  knows the preferences too);
- the ceiling of the improvement issue 18 measures is 1 − conditioned / plain. A trained model
  adds its own error to both, so its improvement is lower.

The same for three states of knowledge: `hidden` (the shipped phantoms: nothing of the plan is an
input), `beams` (the beam angles known), `plates` (what a beam plate, `--beam-plates`, carries: the
angles, margin, penumbra and tail), and `known` (every plan parameter: the plain floor is then the
preference floor of bench_preferences, and the conditioned floor 0).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch

from nas_dose.data.synth import phantom, preference_plans
from nas_dose.data.synth.anatomy import draw_plan

from common import Row, add_settings_arguments, mean_sd, result, settings_option
from common import main as bench_main

# Plan parameters each state of knowledge keeps at the phantom's own values.
KNOWN = {"hidden": (), "beams": ("angles",), "plates": ("angles", "margin_mm", "penumbra_mm", "tail")}


@dataclass
class Settings:
    """The held-out phantoms of bench_preferences; 16 draws of the hidden plan per phantom."""

    grid: int = 16
    patients: int = 6
    plans: int = 6
    draws: int = 16
    seed: int = 1000
    threads: int | None = 1

    def quick(self) -> Settings:
        return replace(self, patients=1, plans=3, draws=3)


def floors(s: Settings, index: int) -> dict[str, dict[str, float]]:
    """Plain and conditioned floors (Gy) of one phantom in each state of knowledge."""
    ph = phantom(index, s.grid, s.seed)
    draws = np.random.default_rng([s.seed, index, 2])
    out = {}
    for state, kept in KNOWN.items():
        doses = np.empty((s.draws, s.plans, int(ph.mask.sum())), np.float32)
        for m in range(s.draws):
            plan = ph.plan if m == 0 else {**draw_plan(draws), **{key: ph.plan[key] for key in kept}}
            plan = {**plan, "slab_mm": ph.plan["slab_mm"]}
            # the phantom's own settings: its preference stream, as `--preferences K` draws it
            settings = np.random.default_rng(np.random.SeedSequence([s.seed, index, s.plans]))
            plans = preference_plans(settings, s.plans, ph.dose, plan, ph.mask, ph.structures["PTV70"])
            doses[m] = plans.doses[:, ph.mask]
        plain = np.abs(doses - np.median(doses.reshape(-1, doses.shape[-1]), axis=0)).mean()
        conditioned = np.abs(doses - np.median(doses, axis=0, keepdims=True)).mean()
        out[state] = {"plain": float(plain), "conditioned": float(conditioned)}
        if state == "hidden":  # the usual plan's parameters, all known: the preferences alone
            own = doses[0]
            out["known"] = {"plain": float(np.abs(own - np.median(own, axis=0)).mean()), "conditioned": 0.0}
    return out


def run(quick: bool, device: str = "cpu", settings: Settings | None = None) -> dict[str, Any]:
    s = settings or (Settings().quick() if quick else Settings())
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    started = time.perf_counter()
    per_patient = [floors(s, i) for i in range(s.patients)]
    rows, summary = [], {}
    for state in ("hidden", "beams", "plates", "known"):
        plain = [p[state]["plain"] for p in per_patient]
        conditioned = [p[state]["conditioned"] for p in per_patient]
        ceiling = 1.0 - float(np.mean(conditioned)) / float(np.mean(plain))
        summary[state] = {"plain_floor": float(np.mean(plain)), "conditioned_floor": float(np.mean(conditioned)),
                          "ceiling": ceiling}
        rows.append(Row(f"ceiling of the improvement, conditioned vs plain: {state}", ceiling,
                        detail="plain floor {:.3f} ± {:.3f} Gy, conditioned floor {:.3f} ± {:.3f} Gy over {} "
                               "phantoms".format(*mean_sd(plain), *mean_sd(conditioned), s.patients)))
    wall = time.perf_counter() - started
    return result("preference_ceiling", torch.device("cpu"), rows,
                  measurements={"settings": asdict(s), "per_patient": per_patient, "summary": summary,
                                "wall_seconds": wall},
                  notes=[f"{s.patients} phantoms of data seed {s.seed} at {s.grid}³, {s.draws} plan draws × "
                         f"{s.plans} preference settings each; {wall:.0f} s"])


if __name__ == "__main__":
    bench_main("preference_ceiling", run, __doc__.splitlines()[0],
               add=partial(add_settings_arguments, defaults=Settings()),
               options=partial(settings_option, defaults=Settings()))
