"""Planning preferences: the sliders a conditioned model takes, their names, ranges and meaning.

A plan's preferences are a vector in `NAMES` order:

- ``oar``: how hard the plan spares the organs at risk, 0 (hardly) to 1 (as hard as the
  optimiser can); 0.5 is the synthetic phantoms' usual plan. The mean dose of every spared OAR
  falls as it rises.
- ``hi``: the homogeneity index of the PTV70 dose, (D2 - D98) / D50 (ICRU 83), from 0 (perfectly
  homogeneous) to 1. It is measured on the plan's own dose (`homogeneity_index`), so asking a
  model for ``hi=0.1`` asks for a dose whose PTV70 has that HI.

A conditioned model sees each value scaled to [0, 1] by its range (`normalize`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import NasDoseError

# name -> (low, high, meaning); the order is the vector's.
PREFERENCES: dict[str, tuple[float, float, str]] = {
    "oar": (0.0, 1.0, "OAR-sparing weight: 0 hardly spares the organs at risk, 1 spares them hardest"),
    "hi": (0.0, 1.0, "homogeneity index of the PTV70 dose, (D2 - D98) / D50: 0 is perfectly homogeneous"),
}
NAMES: tuple[str, ...] = tuple(PREFERENCES)


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
