"""Planning preferences: the sliders a conditioned model takes, their names, ranges and meaning.

A plan's preferences are a vector in `NAMES` order:

- ``oar``: how hard the plan spares the organs at risk, 0 (hardly) to 1 (as hard as the
  optimiser can); 0.5 is the synthetic phantoms' usual plan. The mean dose of every spared OAR
  falls as it rises.
- ``hi``: the homogeneity index of the PTV70 dose, (D2 - D98) / D50 (ICRU 83), from 0 (perfectly
  homogeneous) to 1. It is measured on the plan's own dose (`homogeneity_index`), so asking a
  model for ``hi=0.1`` asks for a dose whose PTV70 has that HI.

A conditioned model sees each value scaled to [0, 1] by its range (`normalize`).

A plan made without a recorded sparing weight (a real patient's single plan) gets one measured
(`SparingScale`): 1 minus the mean, over its spared OARs, of the rank of the OAR's mean dose
among a population of plans (0.5: a typical plan). This measures where the plan stands in the
population, anatomy included (an OAR beside the target gets a high dose however hard it was
spared), not the planner's intent: the slider then spans the population's variation. Asking a
model for `MEASURED` asks, patient by patient, for the preferences measured on its own dose
(`nasdose predict --preference measured`): where its plan stands, as far as its dose tells.
"""
from __future__ import annotations

from typing import Final, Iterable, Mapping, Sequence

import numpy as np

from ..errors import NasDoseError
from .patient import OARS, TARGETS

# name -> (low, high, meaning); the order is the vector's.
PREFERENCES: dict[str, tuple[float, float, str]] = {
    "oar": (0.0, 1.0, "OAR-sparing weight: 0 hardly spares the organs at risk, 1 spares them hardest"),
    "hi": (0.0, 1.0, "homogeneity index of the PTV70 dose, (D2 - D98) / D50: 0 is perfectly homogeneous"),
}
NAMES: tuple[str, ...] = tuple(PREFERENCES)
MEASURED: Final = "measured"  # in place of values: each patient's own measured preferences
SPARED_OARS: tuple[str, ...] = tuple(o for o in OARS if o != "Mandible")  # the OARs `oar` speaks of


def describe() -> str:
    """One line per preference: name, range, meaning (for help texts and errors)."""
    return "; ".join(f"{name} in [{lo:g}, {hi:g}]: {text}" for name, (lo, hi, text) in PREFERENCES.items())


def check(values: Mapping[str, float], names: Sequence[str] = NAMES) -> np.ndarray:
    """The vector (float32, `names` order) of a complete mapping name -> value, each in its range."""
    unknown = sorted(set(values) - set(PREFERENCES))
    if unknown:
        raise NasDoseError(f"unknown preference {unknown[0]!r} (known: {', '.join(PREFERENCES)})")
    missing = [n for n in names if n not in values]
    if missing:
        raise NasDoseError(f"preference {missing[0]!r} not given (the model takes {', '.join(names)})")
    for name, value in values.items():
        lo, hi, _ = PREFERENCES[name]
        if not np.isfinite(value) or not lo <= value <= hi:
            raise NasDoseError(f"preference {name}={value:g} is out of its range [{lo:g}, {hi:g}]")
    return np.array([values[n] for n in names], dtype=np.float32)


def parse(text: str) -> dict[str, float]:
    """`oar=0.7,hi=0.05` -> {name: value}, names and ranges checked (values may be partial)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise NasDoseError(f"preference {part!r}: expected name=value (e.g. oar=0.7,hi=0.1)")
        try:
            number = float(value)
        except ValueError:
            raise NasDoseError(f"preference {name}: {value.strip()!r} is not a number") from None
        if name in out:
            raise NasDoseError(f"preference {name!r} given twice")
        out[name] = number
    if not out:
        raise NasDoseError("no preference given (expected e.g. oar=0.7,hi=0.1)")
    check(out, names=())
    return out


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """`oar=0,0.25,0.5` -> ("oar", [0, 0.25, 0.5]): one preference and the values to sweep it over."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not values.strip():
        raise NasDoseError(f"sweep {text!r}: expected name=v1,v2,... (e.g. oar=0,0.25,0.5,0.75,1)")
    swept = [parse(f"{name}={v}")[name] for v in values.split(",") if v.strip()]
    if len(set(swept)) != len(swept):
        raise NasDoseError(f"sweep {text!r}: a value is given twice")
    return name, swept


def normalize(values: np.ndarray, names: Sequence[str] = NAMES) -> np.ndarray:
    """Each value scaled to [0, 1] by its documented range: what a conditioned network sees."""
    lo = np.array([PREFERENCES[n][0] for n in names], dtype=np.float32)
    hi = np.array([PREFERENCES[n][1] for n in names], dtype=np.float32)
    return ((np.asarray(values, dtype=np.float32) - lo) / (hi - lo)).astype(np.float32)


def homogeneity_index(dose: np.ndarray, target: np.ndarray) -> float:
    """(D2 - D98) / D50 of the dose in `target` (ICRU 83); 0 for a target without voxels."""
    values = dose[target]
    if not values.size:
        return 0.0
    d2, d50, d98 = np.percentile(values, [98, 50, 2])
    return float((d2 - d98) / d50) if d50 > 0 else 0.0


def spared_mean_doses(dose: np.ndarray, structures: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean dose (Gy) of each contoured spared OAR outside the targets (its overlap is target)."""
    targets = np.logical_or.reduce([structures[t] for t in TARGETS if t in structures] or [np.zeros(dose.shape, bool)])
    return {o: float(dose[m].mean()) for o in SPARED_OARS if o in structures and (m := structures[o] & ~targets).any()}


class SparingScale:
    """A population's spared-OAR mean doses, to place one plan's sparing in it (`oar` measured)."""

    def __init__(self, plans: Iterable[Mapping[str, float]]) -> None:
        """`plans`: each plan's `spared_mean_doses`."""
        collected: dict[str, list[float]] = {}
        for means in plans:
            for name, value in means.items():
                collected.setdefault(name, []).append(value)
        self.doses = {name: np.sort(values) for name, values in collected.items()}
        if not self.doses:
            raise NasDoseError("measured preferences: no plan of the population has a spared OAR")

    def sparing(self, means: Mapping[str, float]) -> float:
        """1 - the mean rank (mid-rank, 0 to 1) of the plan's OAR mean doses in the population;
        0.5 for a plan without any spared OAR the population knows."""
        ranks = [(np.searchsorted(ref, means[name], "left") + np.searchsorted(ref, means[name], "right"))
                 / (2 * len(ref)) for name, ref in self.doses.items() if name in means]
        return float(1.0 - np.mean(ranks)) if ranks else 0.5

    def measure(self, dose: np.ndarray, structures: Mapping[str, np.ndarray]) -> np.ndarray:
        """The plan's measured preferences, in NAMES order."""
        ptv70 = structures.get("PTV70", np.zeros(dose.shape, bool))
        return check({"oar": self.sparing(spared_mean_doses(dose, structures)),
                      "hi": min(homogeneity_index(dose, ptv70), PREFERENCES["hi"][1])})
