"""Synthetic head-and-neck phantoms with a beam-model dose: nasdose's embedded default data set.

Every structure is an implicit function of continuous physical coordinates (millimetres from
the grid centre, negative inside), so grids 16 to 128 sample the same patient. The dose comes
from 5-9 equi-spaced coplanar parallel beams rotating about the axial axis: beam's-eye-view
apertures of each target with a margin, a blurred penumbra and a wide tail, lower fluence on
rays through organs at risk, a depth dose over the radiological depth (path integral of the
CT-derived density), one weight per target from a small non-negative least squares, a few
multiplicative fluence-modulation passes (a simple IMRT: homogeneous targets, OAR sparing)
and a 3D scatter blur. Hidden plan parameters (beam number and angles, penumbra, modulation
passes) vary between patients like planners' habits do. Arrays follow the OpenKBP conventions
(axis 0 anterior to posterior, axis 1 right to left, axis 2 superior to inferior; CT as
HU + 1024; dose in Gy, exactly zero outside the possible-dose mask).

With `preferences=K` each phantom also holds K more plans of the same anatomy and beams, made
with other OAR-sparing weights and target-homogeneity goals (a stratified draw of both), each
with its preferences (`oar`: the weight asked for; `hi`: the HI its PTV70 dose measures).
With `beam_plates` each phantom also holds its plan's beam arrangement as an extra input volume
(`beam_plate`, beam.py): without it the beams are hidden from a model, and they decide much of the
dose outside the targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ...config import ConfigError
from ...errors import NasDoseError
from ...io import output_file, refuse_existing
from ...progress import say
from ..patient import CT_STORED_RANGE, Patient, Plans
from ..preferences import NAMES, homogeneity_index
from ..store import write_dataset
from .anatomy import (
    BASE_VOXEL_MM,
    axes,
    draw_anatomy,
    draw_plan,
    hounsfield,
    scatter_mask,
    slab,
    structure_fields,
    voxel_mm,
    voxelize,
)
from .beam import MIN_DOSE_GY, beam_plate, plan_dose

__all__ = ["BASE_VOXEL_MM", "SUPPORTED_GRIDS", "Config", "Inputs", "Phantom", "phantom", "preference_plans", "run",
           "split_for", "synth_patient", "synth_patients", "voxel_mm"]
SUPPORTED_GRIDS = (16, 32, 64, 128)
# The preference plans' homogeneity goals span this (`hi_goal` in beam.py).
HI_GOAL_RANGE = (0.0, 0.3)


def split_for(index: int, n: int) -> str:
    """Split of patient `index` among `n`: about 70/20/10 train/validation/test, at least one
    validation patient, test patients only when n >= 10."""
    _check_count(n)
    n_test = int(0.1 * n + 0.5) if n >= 10 else 0
    n_val = max(1, int(0.2 * n + 0.5))
    n_train = n - n_val - n_test
    if index < n_train:
        return "train"
    return "validation" if index < n_train + n_val else "test"


def synth_patients(n: int, grid: int, seed: int, unlabeled: int = 0, preferences: int = 0,
                   beam_plates: bool = False) -> Iterator[Patient]:
    """`n` phantoms pt_1..pt_n, each with its split and source in `attrs`, then `unlabeled` more
    (pt_n+1...) in the "unlabeled" split without their dose: contoured patients with no plan,
    for distillation to learn from the teacher alone. `preferences`: plans per labeled phantom;
    `beam_plates`: each phantom's beam plate as an extra input."""
    _check_count(n)
    _check_grid(grid)
    if isinstance(unlabeled, bool) or not isinstance(unlabeled, (int, np.integer)) or unlabeled < 0:
        raise NasDoseError(f"synth: the number of unlabeled patients must be >= 0 (got {unlabeled!r})")
    for index in range(n + unlabeled):
        patient = synth_patient(index, grid, seed, preferences if index < n else 0, beam_plates)
        if index < n:
            patient.attrs["split"] = split_for(index, n)
        else:
            patient.attrs["split"], patient.dose = "unlabeled", None
        yield patient


def synth_patient(index: int, grid: int, seed: int, preferences: int = 0, beam_plates: bool = False) -> Patient:
    """Phantom `pt_{index+1}`: deterministic in (index, seed), whatever the grid or the count;
    with `preferences` more plans (`Patient.plans`), deterministic in (index, seed, preferences);
    with `beam_plates` its plan's beam plate in `Patient.extra` (the same phantom otherwise)."""
    if isinstance(preferences, bool) or not isinstance(preferences, (int, np.integer)) or preferences < 0:
        raise NasDoseError(f"synth: the number of preference plans must be >= 0 (got {preferences!r})")
    ph = phantom(index, grid, seed)
    dose = np.where(ph.mask, ph.usual_dose, 0.0).astype(np.float32)
    # Noise is drawn last so that every earlier draw is independent of the grid.
    noise = ph.rng.normal(0.0, ph.anatomy["noise_hu"], size=ph.hu.shape) * (ph.hu > -1000)
    ct = np.clip(ph.hu + noise + 1024.0, *CT_STORED_RANGE).astype(np.float32)
    plans = None
    if preferences:
        # Their own stream, so the phantom is the same with or without them.
        pref_rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(preferences)]))
        plans = preference_plans(pref_rng, preferences, ph.dose, ph.plan, ph.mask, ph.structures["PTV70"])
    extra = {"beam_plate": np.where(ph.body, beam_plate(ph.coords, grid, ph.structures, ph.plan), 0)
             .astype(np.float32)} if beam_plates else {}
    return Patient(id=f"pt_{index + 1}", ct=ct, possible_dose_mask=ph.mask, structures=ph.structures,
                   voxel_mm=voxel_mm(grid), dose=dose, attrs={"source": f"synth:seed={seed}"}, plans=plans,
                   extra=extra)


@dataclass
class Phantom:
    """A phantom's anatomy and usual plan before its dose is stored: what a benchmark needs to
    plan the same anatomy again with other plan parameters (`dose`)."""

    rng: np.random.Generator  # the phantom's stream, after the anatomy and plan were drawn
    anatomy: dict
    plan: dict
    grid: int
    coords: tuple
    structures: dict[str, np.ndarray]
    hu: np.ndarray
    body: np.ndarray
    usual_dose: np.ndarray  # the usual plan's dose (Gy) on the whole grid
    mask: np.ndarray  # its possible-dose mask

    def dose(self, plan: dict) -> np.ndarray:
        """The dose (Gy, on the whole grid) of `plan` on this anatomy."""
        return plan_dose(self.coords, self.grid, self.hu, self.structures, plan)


def phantom(index: int, grid: int, seed: int) -> Phantom:
    """Phantom `pt_{index+1}`'s anatomy and usual plan (synth_patient's first draws)."""
    _check_grid(grid)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise NasDoseError(f"synth: patient index must be a non-negative integer (got {index!r})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise NasDoseError(f"synth: seed must be a non-negative integer (got {seed!r})")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    anatomy = draw_anatomy(rng)
    plan = draw_plan(rng)
    coords = axes(grid)
    body_field, near, fields = structure_fields(anatomy, coords, voxel_mm(grid)[0])
    structures = {name: scatter_mask(m, near) for name, m in voxelize(fields, anatomy).items()}
    hu = np.full(near.shape, -1024.0, dtype=np.float32)
    hu[near] = hounsfield(fields, anatomy, grid)
    body = body_field < 0
    dose = plan_dose(coords, grid, hu, structures, plan)
    mask = body & slab(coords[2], structures, plan) & (dose >= MIN_DOSE_GY)
    return Phantom(rng, anatomy, plan, grid, coords, structures, hu, body, dose, mask)


def preference_plans(rng: np.random.Generator, k: int, plan_dose_of: Callable[[dict], np.ndarray], plan: dict,
                     mask: np.ndarray, ptv70: np.ndarray) -> Plans:
    """K plans of the phantom's beams: OAR-sparing weights and homogeneity goals each drawn once
    from K equal strata of their range (a Latin hypercube), so the plans span both sliders."""
    oar = (rng.permutation(k) + rng.uniform(size=k)) / k
    hi_goal = HI_GOAL_RANGE[0] + (rng.permutation(k) + rng.uniform(size=k)) / k * np.diff(HI_GOAL_RANGE)[0]
    doses = np.stack([np.where(mask, plan_dose_of({**plan, "oar": float(o), "hi_goal": float(h)}), 0.0)
                      for o, h in zip(oar, hi_goal)]).astype(np.float32)
    values = np.array([[o, homogeneity_index(d, ptv70)] for o, d in zip(oar, doses)], dtype=np.float32)
    return Plans(doses=doses, values=values, names=NAMES)


def _check_grid(grid: int) -> None:
    if isinstance(grid, bool) or grid not in SUPPORTED_GRIDS:
        raise NasDoseError(f"synth: grid must be a power of two from 16 to 128 (got {grid!r})")


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise NasDoseError(f"synth: need at least 2 patients (training and validation), got {n!r}")


@dataclass
class Config:
    """`patients` phantoms with a plan, `unlabeled` more without one, on `grid`³, from `seed`."""

    patients: int = 24
    unlabeled: int = 0
    preferences: int = 0  # more plans per labeled phantom, each with its preferences
    beam_plates: bool = False  # each phantom's beam arrangement as an extra input channel
    grid: int = 32
    seed: int = 0

    def validate(self) -> None:
        if (self.patients < 2 or self.unlabeled < 0 or self.preferences < 0 or self.seed < 0
                or self.grid not in SUPPORTED_GRIDS):
            raise ConfigError(f"synth: patients >= 2, unlabeled >= 0, preferences >= 0, seed >= 0 and a grid in "
                              f"{SUPPORTED_GRIDS} (got {self.patients}, {self.unlabeled}, {self.preferences}, "
                              f"{self.seed}, {self.grid})")


@dataclass(frozen=True)
class Inputs:
    """Phantoms need no input."""


def run(config: Config, inputs: Inputs, out: Path, resume: bool = False, *, force: bool = False) -> None:
    """The phantoms -> the data set file `out`, written atomically (a killed run is redone whole);
    an existing `out` is replaced only with `force`."""
    total = config.patients + config.unlabeled
    with output_file(out):
        refuse_existing([out], force)
        write_dataset(out, synth_patients(config.patients, config.grid, config.seed, config.unlabeled,
                                          config.preferences, config.beam_plates),
                      source=f"synth:seed={config.seed}", grid=config.grid, total=total)
    plans = f", {config.preferences} preference plans each" if config.preferences else ""
    plans += ", with beam plates" if config.beam_plates else ""
    say(f"wrote {out}: {total} synthetic patients ({config.unlabeled} unlabeled{plans}) on a {config.grid}^3 grid")
