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
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from scipy import ndimage
from scipy.optimize import nnls

from ..errors import NasDoseError
from .patient import CT_STORED_RANGE, OARS, OPENKBP_GRID, PRESCRIPTION_GY, TARGETS, Patient

BASE_VOXEL_MM = (3.906, 3.906, 2.5)
SUPPORTED_GRIDS = (16, 32, 64, 128)
# Half extents (mm) of the physical field of view, the same at every grid.
_HALF_FOV = tuple(OPENKBP_GRID * v / 2 for v in BASE_VOXEL_MM)

# How often a contoured OAR is missing, roughly as in the OpenKBP training set.
_OAR_ABSENT_P = {"Brainstem": 0.04, "SpinalCord": 0.02, "RightParotid": 0.04,
                 "LeftParotid": 0.04, "Esophagus": 0.5, "Larynx": 0.35, "Mandible": 0.3}
# Spared OARs: voxel dose (Gy) above which the fluence optimisation pushes back, and how hard
# (relative to a target). The mandible is not spared, as in most plans.
_OAR_TOLERANCE = {"Brainstem": (50.0, 0.5), "SpinalCord": (38.0, 2.0),
                  "RightParotid": (24.0, 0.3), "LeftParotid": (24.0, 0.3),
                  "Esophagus": (40.0, 0.2), "Larynx": (40.0, 0.2)}
# Primary tumour sites and how often each is drawn.
_SITES = ("oropharynx", "larynx", "nasopharynx", "oral_cavity", "neck_node")
_SITE_P = (0.4, 0.2, 0.15, 0.15, 0.1)
# Body outline along the patient's axial coordinate s (mm): AP half width, AP centre and
# right-left half width; the knots after the neck move with the drawn neck length.
_BODY_S = np.array([-150.0, -120, -90, -60, -35, -15, 0, 15])
_BODY_HAP = np.array([85.0, 102, 106, 104, 95, 85, 72, 64, 66, 82, 92, 95])
_BODY_AC = np.array([-12.0, -20, -24, -24, -24, -18, -10, -4, 0, 12, 18, 20])
_BODY_HLR = np.array([64.0, 76, 80, 78, 74, 70, 66, 62, 64, 150, 195, 205])
_FINE_MM = 2.0  # bin width of the beam's-eye-view fluence maps
_MIN_DOSE_GY = 0.05  # below this the plan's dose grid is treated as empty


def voxel_mm(grid: int) -> tuple[float, float, float]:
    """Voxel size on `grid`: the OpenKBP voxel scaled so every grid spans the same volume."""
    f = OPENKBP_GRID / grid
    return tuple(float(v * f) for v in BASE_VOXEL_MM)  # type: ignore[return-value]


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


def synth_patients(n: int, grid: int, seed: int, unlabeled: int = 0) -> Iterator[Patient]:
    """`n` phantoms pt_1..pt_n, each with its split and source in `attrs`, then `unlabeled` more
    (pt_n+1...) in the "unlabeled" split without their dose: contoured patients with no plan,
    for distillation to learn from the teacher alone."""
    _check_count(n)
    _check_grid(grid)
    if isinstance(unlabeled, bool) or not isinstance(unlabeled, (int, np.integer)) or unlabeled < 0:
        raise NasDoseError(f"synth: the number of unlabeled patients must be >= 0 (got {unlabeled!r})")
    for index in range(n + unlabeled):
        patient = synth_patient(index, grid, seed)
        if index < n:
            patient.attrs["split"] = split_for(index, n)
        else:
            patient.attrs["split"], patient.dose = "unlabeled", None
        yield patient


def synth_patient(index: int, grid: int, seed: int) -> Patient:
    """Phantom `pt_{index+1}`: deterministic in (index, seed), whatever the grid or the count."""
    _check_grid(grid)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise NasDoseError(f"synth: patient index must be a non-negative integer (got {index!r})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise NasDoseError(f"synth: seed must be a non-negative integer (got {seed!r})")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    anatomy = _draw_anatomy(rng)
    plan = _draw_plan(rng)
    coords = _axes(grid)
    body_field, near, fields = _fields(anatomy, coords, voxel_mm(grid)[0])
    structures = {name: _scatter_mask(m, near) for name, m in _voxelize(fields, anatomy).items()}
    hu = np.full(near.shape, -1024.0, dtype=np.float32)
    hu[near] = _hounsfield(fields, anatomy, grid)
    body = body_field < 0
    dose = _plan_dose(coords, grid, hu, structures, plan)
    mask = body & _slab(coords[2], structures, plan) & (dose >= _MIN_DOSE_GY)
    dose = np.where(mask, dose, 0.0).astype(np.float32)
    # Noise is drawn last so that every earlier draw is independent of the grid.
    noise = rng.normal(0.0, anatomy["noise_hu"], size=hu.shape) * (hu > -1000)
    ct = np.clip(hu + noise + 1024.0, *CT_STORED_RANGE).astype(np.float32)
    return Patient(id=f"pt_{index + 1}", ct=ct, possible_dose_mask=mask, structures=structures,
                   voxel_mm=voxel_mm(grid), dose=dose, attrs={"source": f"synth:seed={seed}"})


def _check_grid(grid: int) -> None:
    if isinstance(grid, bool) or grid not in SUPPORTED_GRIDS:
        raise NasDoseError(f"synth: grid must be a power of two from 16 to 128 (got {grid!r})")


def _check_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise NasDoseError(f"synth: need at least 2 patients (training and validation), got {n!r}")


def _axes(grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical voxel-centre coordinates (mm from the grid centre) along each axis."""
    return tuple((np.arange(grid) + 0.5) * v - h  # type: ignore[return-value]
                 for v, h in zip(voxel_mm(grid), _HALF_FOV))


# ----------------------------------------------------------------------------- anatomy draws

def _draw_anatomy(rng: np.random.Generator) -> dict:
    """All random anatomy parameters, in a fixed draw order (determinism across grids)."""
    u = rng.uniform
    side = 1.0 if rng.random() < 0.5 else -1.0  # +1: tumour on the patient's left
    a = {
        "offset": np.array([u(-15, 15), u(-12, 12), u(-25, 25)]),
        "angles": np.deg2rad([u(-4, 4), u(-8, 8), u(-6, 6)]),  # roll, pitch, yaw
        "scale": u(0.9, 1.1),
        "width": np.array([u(0.93, 1.08), u(0.93, 1.06)]),  # body AP and RL stretch
        "s_top": u(-185.0, -150.0),
        "neck": u(20.0, 55.0),
        "fat_mm": u(3.0, 12.0),
        "soft_hu": u(25.0, 50.0),
        "fat_hu": u(-110.0, -70.0),
        "bone_hu": u(900.0, 1300.0),
        "noise_hu": u(8.0, 20.0),
        "brainstem": ([u(4, 12), u(-3, 3), u(-80, -65)], [u(9, 13), u(11, 15), u(20, 28)]),
        "cord_r": u(4.5, 6.5),
        "airway_r": (u(6.0, 9.0), u(8.0, 11.0)),
        "larynx": (u(15.0, 40.0), [u(14, 19), u(16, 22), u(16, 24)]),
        "esophagus_r": u(5.0, 7.5),
        "parotids": [([u(-12, 0), sgn * u(46, 58), u(-40, -25)], [u(13, 19), u(9, 13), u(17, 26)])
                     for sgn in (-1.0, 1.0)],
        "mandible_s": (u(-32, -24), u(-6, 0)),
        "absent": {name: bool(rng.random() < p) for name, p in _OAR_ABSENT_P.items()},
    }
    a["targets"] = _draw_targets(rng, side)
    return a


def _draw_targets(rng: np.random.Generator, side: float) -> dict:
    """Primary (PTV70) lobes, optional PTV63 and PTV56 recipes, in patient coordinates."""
    u = rng.uniform
    site = _SITES[int(rng.choice(len(_SITES), p=_SITE_P))]
    centre = {
        "oropharynx": [u(-24, -12), side * u(0, 22), u(-32, -8)],
        "larynx": [u(-34, -24), side * u(0, 12), u(15, 45)],
        "nasopharynx": [u(-15, -5), side * u(0, 10), u(-78, -58)],
        "oral_cavity": [u(-58, -42), side * u(0, 18), u(-32, -14)],
        "neck_node": [u(-12, 4), side * u(28, 40), u(-5, 35)],
    }[site]
    lobes = []
    for _ in range(int(rng.integers(1, 4))):
        shift = rng.normal(0.0, 8.0, 3) if lobes else np.zeros(3)
        lobes.append((np.array(centre) + shift, [u(19, 35), u(19, 35), u(22, 44)]))
    ptv63 = None
    if rng.random() < 0.55:
        kind = rng.random()
        ptv63 = {"margin": u(5.0, 10.0) if kind < 0.7 else None,
                 "node": None if kind < 0.5 else
                 ([u(-14, 0), side * u(30, 45), centre[2] + u(10, 40)],
                  [u(10, 17), u(10, 17), u(14, 26)])}
    ptv56 = None
    if rng.random() < 0.88:
        chains = [side] + ([-side] if rng.random() < 0.6 else [])
        # Nodal chains along the neck: (r, a, radius_a, radius_r, s_top, s_bottom) in mm.
        ptv56 = {"margin": u(6.0, 14.0) if rng.random() < 0.5 else None,
                 "chains": [(sd * u(26, 40), u(-8, 8), u(9, 14), u(9, 14),
                             centre[2] - u(0, 15), centre[2] + u(45, 90)) for sd in chains]}
    return {"lobes": lobes, "ptv63": ptv63, "ptv56": ptv56}


def _draw_plan(rng: np.random.Generator) -> dict:
    """Treatment-technique parameters: beams, penumbra, scatter, sparing, dose-grid extent."""
    u = rng.uniform
    n_beams = int(rng.integers(5, 10))
    return {
        "angles": u(0, 2 * np.pi / n_beams) + 2 * np.pi * np.arange(n_beams) / n_beams,
        "margin_mm": u(3.0, 6.0),
        "penumbra_mm": u(3.0, 5.0),
        "tail": (u(0.15, 0.3), u(15.0, 25.0)),  # weight and width (mm) of the fluence tail
        "scatter": (u(0.2, 0.4), u(8.0, 14.0)),  # weight and width (mm) of 3D dose scatter
        "mu_per_mm": u(0.0045, 0.0056),
        "buildup_mm": u(2.0, 4.0),
        "spare": (u(0.6, 0.9), u(0.15, 0.35)),  # fluence cut: OAR-only rays, OAR+target rays
        "oar_weight": u(0.1, 0.4),
        "iterations": int(rng.integers(3, 6)),  # fluence-modulation passes (plan quality)
        "norm": u(1.0, 1.03),  # mean PTV70 dose / 70 Gy
        "slab_mm": (u(10.0, 60.0), u(10.0, 65.0)),  # dose-grid extent beyond the targets
    }


# ----------------------------------------------------------------------------- implicit shapes

def _ellipsoid(p: tuple, centre, radii) -> np.ndarray:
    q = sum(((x - c) / r) ** 2 for x, c, r in zip(p, centre, radii))
    return (np.sqrt(q) - 1.0) * min(radii)


def _tube(p: tuple, a0, r0, rad_a: float, rad_r: float, s_lo: float, s_hi: float) -> np.ndarray:
    """Elliptic tube along the patient's axial axis; its centre (a0, r0) may vary with s."""
    pa, pr, ps = p
    q = np.sqrt(((pa - a0) / rad_a) ** 2 + ((pr - r0) / rad_r) ** 2)
    return np.maximum((q - 1.0) * min(rad_a, rad_r), np.maximum(s_lo - ps, ps - s_hi))


def _interp(x: np.ndarray, knots, values) -> np.ndarray:
    return np.interp(x, knots, values).astype(np.float32)


def _rotation(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Patient orientation: roll in the (r, s) plane, pitch in (a, s), yaw in (a, r)."""
    def plane(i: int, j: int, t: float) -> np.ndarray:
        m = np.eye(3)
        m[i, i] = m[j, j] = np.cos(t)
        m[i, j], m[j, i] = -np.sin(t), np.sin(t)
        return m
    return plane(1, 2, roll) @ plane(0, 2, pitch) @ plane(0, 1, yaw)


def _fields(an: dict, coords: tuple, voxel: float
            ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The skin field on the grid, the voxels within a voxel of the skin or inside (`near`),
    and every tissue's and structure's implicit function (mm, negative inside) at those voxels
    only: nothing but air lies elsewhere, and this keeps large grids fast."""
    x = np.meshgrid(*[(c - o).astype(np.float32) for c, o in zip(coords, an["offset"])],
                    indexing="ij")
    rot = _rotation(*an["angles"]) / an["scale"]
    p = tuple(np.float32(rot[i, 0]) * x[0] + np.float32(rot[i, 1]) * x[1]
              + np.float32(rot[i, 2]) * x[2] for i in range(3))
    body_field = _body_field(p, an)
    near = body_field < voxel
    q = tuple(c[near] for c in p)
    body = body_field[near]
    f = {"body": body}
    skull_zone = q[2] + 60.0  # the cranium is above s = -60 mm
    f["skull"] = np.maximum(np.maximum(body + an["fat_mm"] + 4.0, -(body + an["fat_mm"] + 11.0)),
                            skull_zone)
    f["brain"] = np.maximum(body + an["fat_mm"] + 11.0, skull_zone)
    f.update(_organ_fields(q, an))
    # Targets stay clear of the cord (7 mm) and the brainstem (3 mm), as planning PTVs do.
    avoid = np.minimum(f["SpinalCord"] - 7.0, f["Brainstem"] - 3.0)
    f.update(_target_fields(q, an["targets"], np.maximum(body + 5.0, -avoid)))
    return body_field, near, f


def _body_field(p: tuple, an: dict) -> np.ndarray:
    """Skin surface: elliptic cross-sections (head, face, neck, shoulders) along s, rounded top."""
    pa, pr, ps = p
    knots = np.concatenate([_BODY_S, an["neck"] + np.array([0.0, 25, 50, 400])])
    taper = np.sqrt(np.clip((ps - np.float32(an["s_top"])) / np.float32(45.0), 1e-4, 1.0))
    hap = _interp(ps, knots, _BODY_HAP * an["width"][0]) * taper
    hlr = _interp(ps, knots, _BODY_HLR * an["width"][1]) * taper
    q = np.sqrt(((pa - _interp(ps, knots, _BODY_AC)) / hap) ** 2 + (pr / hlr) ** 2)
    return np.maximum((q - 1.0) * np.minimum(hap, hlr), np.float32(an["s_top"]) - ps)


def _organ_fields(p: tuple, an: dict) -> dict[str, np.ndarray]:
    """OARs, spine, airway and mandible in patient coordinates (a, r, s)."""
    pa, pr, ps = p
    f: dict[str, np.ndarray] = {}
    cord_a = _interp(ps, [-50.0, 0.0, 60.0, 250.0], [10.0, 20.0, 26.0, 34.0])
    air_a = _interp(ps, [-45.0, -10.0, 20.0, 60.0, 250.0], [-8.0, -14.0, -24.0, -30.0, -28.0])
    f["Brainstem"] = _ellipsoid(p, *an["brainstem"])
    f["SpinalCord"] = _tube(p, cord_a, 0.0, an["cord_r"], an["cord_r"] * 1.2, -55.0, 400.0)
    canal = _tube(p, cord_a, 0.0, 8.0, 9.0, -40.0, 400.0)
    arch = np.maximum(_tube(p, cord_a, 0.0, 14.0, 15.0, -40.0, 400.0), -canal)
    spinous = _tube(p, cord_a + 22.0, 0.0, 12.0, 4.0, -35.0, 400.0)
    segments = np.abs(np.mod(ps + 40.0, 18.0) - 7.0) - 7.0  # vertebrae 14 mm, discs 4 mm
    vertebra = np.maximum(_tube(p, cord_a - 20.0, 0.0, 10.0, 13.0, -35.0, 400.0), segments)
    f["spine"] = np.minimum(np.minimum(arch, spinous), vertebra)
    f["airway"] = _tube(p, air_a, 0.0, *an["airway_r"], -45.0, 400.0)
    s_lar, lar_radii = an["larynx"]
    f["Larynx"] = _ellipsoid(p, [float(np.interp(s_lar, [20.0, 60.0], [-26.0, -32.0])), 0.0,
                                 s_lar], lar_radii)
    f["Esophagus"] = _tube(p, air_a + 17.0, 4.0, an["esophagus_r"], an["esophagus_r"],
                           s_lar + 15.0, 400.0)
    (rc, rr), (lc, lr) = an["parotids"]
    f["RightParotid"] = _ellipsoid(p, rc, rr)
    f["LeftParotid"] = _ellipsoid(p, lc, lr)
    s_lo, s_hi = an["mandible_s"]
    ring = np.sqrt(((pa + 25.0) / 55.0) ** 2 + (pr / 46.0) ** 2)
    arc = np.maximum(np.maximum(np.abs(ring - 1.0) * 50.0 - 5.0, pa + 10.0),
                     np.maximum(s_lo - ps, ps - s_hi))
    rami = np.minimum(_tube(p, -8.0, -44.0, 10.0, 4.0, -58.0, s_hi - 4.0),
                      _tube(p, -8.0, 44.0, 10.0, 4.0, -58.0, s_hi - 4.0))
    f["Mandible"] = np.minimum(arc, rami)
    return f


def _target_fields(p: tuple, t: dict, inside: np.ndarray) -> dict[str, np.ndarray]:
    """PTV70 lobes, PTV63 (margin and/or ipsilateral node), PTV56 (margin and nodal chains),
    each cut to the allowed region `inside` (negative where a target may lie); overlaps are
    resolved when voxelizing."""
    f70 = np.minimum.reduce([_ellipsoid(p, c, r) for c, r in t["lobes"]])
    out = {"PTV70": np.maximum(f70, inside)}
    high = f70
    if t["ptv63"] is not None:
        parts = []
        if t["ptv63"]["margin"] is not None:
            parts.append(f70 - t["ptv63"]["margin"])
        if t["ptv63"]["node"] is not None:
            parts.append(_ellipsoid(p, *t["ptv63"]["node"]))
        f63 = np.minimum.reduce(parts)
        out["PTV63"] = np.maximum(f63, inside)
        high = np.minimum(high, f63)
    if t["ptv56"] is not None:
        chains = t["ptv56"]["chains"]
        parts = [_tube(p, a0, r0, ra, rr, lo, hi) for r0, a0, ra, rr, lo, hi in chains]
        if t["ptv56"]["margin"] is not None:
            parts.append(high - t["ptv56"]["margin"])
        out["PTV56"] = np.maximum(np.minimum.reduce(parts), inside)
    return out


def _voxelize(fields: dict[str, np.ndarray], an: dict) -> dict[str, np.ndarray]:
    """Masks at voxel centres; targets made disjoint (higher prescription wins, as in OpenKBP);
    a present structure too small for the grid keeps its deepest voxel, so none is empty."""
    out: dict[str, np.ndarray] = {}
    for name in OARS:
        if not an["absent"][name]:
            out[name] = _nonempty(fields[name], fields["body"] < 0)
    free = fields["body"] < 0
    for name in sorted((t for t in TARGETS if t in fields), key=lambda t: -PRESCRIPTION_GY[t]):
        out[name] = _nonempty(fields[name], free)
        free &= ~out[name]
    return {name: out[name] for name in OARS + TARGETS if name in out}


def _nonempty(field: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    mask = (field < 0) & allowed
    if not mask.any():
        mask[int(np.argmin(np.where(allowed, field, np.inf)))] = True
    return mask


def _scatter_mask(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    full = np.zeros(where.shape, dtype=bool)
    full[where] = values
    return full


def _hounsfield(f: dict[str, np.ndarray], an: dict, grid: int) -> np.ndarray:
    """Noise-free HU at the given fields' voxels, with partial-volume edges: air, soft tissue,
    fat, brain, bone, airway."""
    h = voxel_mm(grid)[0]

    def frac(field: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - field / h, 0.0, 1.0)

    hu = -1024.0 + frac(f["body"]) * (an["soft_hu"] + 1024.0)
    hu += frac(np.maximum(f["body"], -(f["body"] + an["fat_mm"]))) * (an["fat_hu"] - hu)
    hu += frac(f["brain"]) * (35.0 - hu)
    hu += frac(f["skull"]) * (an["bone_hu"] - hu)
    hu += frac(f["spine"]) * (0.65 * an["bone_hu"] - hu)
    hu += frac(f["Mandible"]) * (1.1 * an["bone_hu"] - hu)
    hu += frac(np.maximum(f["airway"], f["body"] + 2.0)) * (-1000.0 - hu)
    return hu.astype(np.float32)


# ----------------------------------------------------------------------------- dose model

def _slab(s: np.ndarray, structures: dict[str, np.ndarray], plan: dict) -> np.ndarray:
    """Axial extent of the dose grid: the targets' extent plus a drawn margin each side."""
    slices = np.zeros(len(s), dtype=bool)
    for name in TARGETS:
        if name in structures:
            slices |= structures[name].any(axis=(0, 1))
    lo, hi = s[slices].min() - plan["slab_mm"][0], s[slices].max() + plan["slab_mm"][1]
    return ((s >= lo) & (s <= hi))[None, None, :]


class _BeamsEye:
    """Fine 2D maps in a beam's eye view: lateral coordinate v by axial coordinate s."""

    def __init__(self, coords: tuple, grid: int, angle: float, around: tuple[np.ndarray, ...],
                 pad_mm: float) -> None:
        """Maps cover the shadow of the voxels `around` plus `pad_mm`: fluence is zero beyond."""
        cos, sin = np.cos(angle), np.sin(angle)
        vox = voxel_mm(grid)
        # Bins fine enough for a 3 mm penumbra, yet no finer than a quarter voxel needs.
        self.bin = (max(_FINE_MM, vox[0] / 4), max(_FINE_MM, vox[2] / 4))
        self.v = -sin * coords[0][:, None] + cos * coords[1][None, :]  # (g, g)
        self.s = coords[2]
        self.half = (vox[0] * (abs(cos) + abs(sin)) / 2, vox[2] / 2)
        self.voxel = (vox[0], vox[2])
        v, s = self.v[around[0], around[1]], self.s[around[2]]
        self.origin = (v.min() - self.half[0] - pad_mm, s.min() - self.half[1] - pad_mm)
        self.shape = (int(np.ceil((v.max() - v.min() + 2 * (self.half[0] + pad_mm)) / self.bin[0])),
                      int(np.ceil((s.max() - s.min() + 2 * (self.half[1] + pad_mm)) / self.bin[1])))

    def index(self, v: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional map indices of physical (v, s)."""
        return (v - self.origin[0]) / self.bin[0] - 0.5, (s - self.origin[1]) / self.bin[1] - 0.5

    def project(self, voxels: tuple[np.ndarray, ...]) -> np.ndarray:
        """Beam's-eye-view shadow of voxels (nonzero indices): each paints its footprint."""
        i, j, k = voxels
        nv, ns = self.shape
        fv_lo, fs_lo = self.index(self.v[i, j] - self.half[0], self.s[k] - self.half[1])
        fv_hi, fs_hi = self.index(self.v[i, j] + self.half[0], self.s[k] + self.half[1])
        lo_v, hi_v = np.clip(np.ceil(fv_lo), 0, nv), np.clip(np.floor(fv_hi) + 1, 0, nv)
        lo_s, hi_s = np.clip(np.ceil(fs_lo), 0, ns), np.clip(np.floor(fs_hi) + 1, 0, ns)
        corners = np.zeros((nv + 1) * (ns + 1))
        for cv, cs, sign in ((lo_v, lo_s, 1), (hi_v, lo_s, -1), (lo_v, hi_s, -1), (hi_v, hi_s, 1)):
            flat = (cv * (ns + 1) + cs).astype(np.int64)
            corners += sign * np.bincount(flat, minlength=corners.size)
        return corners.reshape(nv + 1, ns + 1).cumsum(0).cumsum(1)[:nv, :ns] > 0.5

    def blur(self, image: np.ndarray, sigma_mm: float) -> np.ndarray:
        return ndimage.gaussian_filter(image.astype(np.float32),
                                       (sigma_mm / self.bin[0], sigma_mm / self.bin[1]),
                                       mode="constant", truncate=3.0)

    def dilate(self, shadow: np.ndarray, margin_mm: float) -> np.ndarray:
        if not shadow.any():
            return shadow
        return ndimage.distance_transform_edt(~shadow, sampling=self.bin) <= margin_mm

    def modulation(self, voxels: tuple[np.ndarray, ...], weight: np.ndarray,
                   ratio: np.ndarray) -> np.ndarray:
        """Per-bin fluence factor: the weighted mean of the voxels' wanted/actual dose ratios
        along each ray (smoothed over about a voxel); 1 where no optimised voxel projects."""
        i, j, k = voxels
        fv, fs = np.rint(self.index(self.v[i, j], self.s[k])).astype(int)
        nv, ns = self.shape
        ok = (fv >= 0) & (fv < nv) & (fs >= 0) & (fs < ns)
        flat = fv[ok] * ns + fs[ok]
        total = np.bincount(flat, weight[ok], nv * ns).reshape(self.shape)
        wanted = np.bincount(flat, (weight * ratio)[ok], nv * ns).reshape(self.shape)
        sigma = (self.voxel[0] / self.bin[0], self.voxel[1] / self.bin[1])
        total = ndimage.gaussian_filter(total, sigma, mode="constant", truncate=2.0)
        wanted = ndimage.gaussian_filter(wanted, sigma, mode="constant", truncate=2.0)
        covered = total > 1e-3 * total.max()
        return np.where(covered, wanted / np.where(covered, total, 1.0), 1.0)

    def sample_at(self, fmap: np.ndarray, voxels: tuple[np.ndarray, ...]) -> np.ndarray:
        """Bilinear samples of a map at the given voxels' centres."""
        i, j, k = voxels
        fv, fs = self.index(self.v[i, j], self.s[k])
        return ndimage.map_coordinates(fmap, [fv, fs], order=1, mode="constant")

    def sample_all(self, fmap: np.ndarray) -> np.ndarray:
        """Bilinear samples at every voxel centre: along s once per slice, then along v."""
        fv, fs = self.index(self.v, self.s)
        k0 = np.clip(np.floor(fs).astype(int), 0, fmap.shape[1] - 2)
        slices = fmap[:, k0] * (1 - (fs - k0)) + fmap[:, k0 + 1] * (fs - k0)
        slices = np.vstack([slices, np.zeros((1, len(fs)), slices.dtype)]).astype(np.float32)
        j0 = np.floor(fv).astype(int)
        w = (fv - j0).astype(np.float32)[:, :, None]
        inside = (j0 >= 0) & (j0 < fmap.shape[0] - 1)
        j0 = np.where(inside, j0, -1)  # the appended zero row
        return slices[j0] * (1 - w) + slices[np.where(inside, j0 + 1, -1)] * w


def _rotate_plane(volume: np.ndarray, c: float, s: float,
                  needed: np.ndarray | None = None) -> np.ndarray:
    """Bilinear rotation of every axial slice: output pixel (i, j) samples the input at the
    centred position (c i - s j, s i + c j); zero outside. Works on whole rows along axis 2,
    skipping input rows that are all zero and output pixels not `needed` (a (g, g) mask)."""
    g = volume.shape[0]
    centred = np.arange(g) - (g - 1) / 2.0
    fa = (c * centred[:, None] - s * centred[None, :] + (g - 1) / 2.0).ravel()
    fr = (s * centred[:, None] + c * centred[None, :] + (g - 1) / 2.0).ravel()
    a0, r0 = np.floor(fa).astype(int), np.floor(fr).astype(int)
    wa, wr = fa - a0, fr - r0
    rows = volume.reshape(g * g, g)
    nonzero = rows.any(axis=1)
    wanted = np.ones(g * g, dtype=bool) if needed is None else needed.ravel()
    out = np.zeros_like(rows)
    for da, dr, w in ((0, 0, (1 - wa) * (1 - wr)), (1, 0, wa * (1 - wr)), (0, 1, (1 - wa) * wr),
                      (1, 1, wa * wr)):
        ia, ir = a0 + da, r0 + dr
        dst = np.flatnonzero(wanted & (ia >= 0) & (ia < g) & (ir >= 0) & (ir < g) & (w > 0))
        src = ia[dst] * g + ir[dst]
        dst, src = dst[nonzero[src]], src[nonzero[src]]
        out[dst] += w[dst, None].astype(volume.dtype) * rows[src]
    return out.reshape(volume.shape)


def _depth_dose(density: np.ndarray, angle: float, grid: int, plan: dict,
                needed: np.ndarray) -> np.ndarray:
    """Relative depth dose (build-up times attenuation) along the radiological depth of a beam
    travelling in direction (cos, sin) of the (axis 0, axis 1) plane; computed on the `needed`
    (g, g) in-plane pixels only."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    beam = _rotate_plane(density, c, s)  # the beam now travels along +axis 0
    depth = (np.cumsum(beam, axis=0) - 0.5 * beam) * np.float32(voxel_mm(grid)[0])
    dd = (1.0 - np.exp(-depth / np.float32(plan["buildup_mm"]))) * np.exp(
        -np.float32(plan["mu_per_mm"]) * depth)
    return _rotate_plane(dd, c, -s, needed)


def _plan_dose(coords: tuple, grid: int, hu: np.ndarray, structures: dict[str, np.ndarray],
               plan: dict) -> np.ndarray:
    """Dose (Gy) of a coplanar plan: per-target weights from a small NNLS, then a few
    multiplicative fluence-modulation passes per beam's-eye-view bin (a simple IMRT)."""
    density = np.clip(1.0 + hu / 1000.0, 0.0, 2.5).astype(np.float32)
    targets = [t for t in TARGETS if t in structures]
    any_target = np.logical_or.reduce([structures[t] for t in targets])
    oars = {o: structures[o] & ~any_target for o in _OAR_TOLERANCE if o in structures}
    oar = np.logical_or.reduce(list(oars.values())) if oars else np.zeros_like(any_target)
    voxels = {name: np.nonzero(structures[name]) for name in targets}
    voxels["any"], voxels["oar"] = np.nonzero(any_target), np.nonzero(oar)
    rows = _rows(structures, targets, oars, plan)
    at = np.unravel_index(rows["index"], hu.shape)
    footprint = (density > 0).any(axis=2)  # in-plane pixels where the patient is

    beams = []
    summed = np.zeros((len(rows["index"]), len(targets)))  # each target's beams, equal weights
    tail_w, tail_sigma = plan["tail"]
    cut_out, cut_in = plan["spare"]
    for angle in plan["angles"]:
        bev = _BeamsEye(coords, grid, angle, voxels["any"],
                        plan["margin_mm"] + 3 * max(plan["penumbra_mm"], tail_sigma))
        shadow_t = bev.dilate(bev.project(voxels["any"]), plan["margin_mm"])
        shadow_o = bev.blur(bev.project(voxels["oar"]), plan["penumbra_mm"])
        sparing = 1.0 - shadow_o * np.where(shadow_t, cut_in, cut_out)
        fluences = []
        for name in targets:
            aperture = bev.dilate(bev.project(voxels[name]), plan["margin_mm"])
            fluences.append(((1 - tail_w) * bev.blur(aperture, plan["penumbra_mm"])
                             + tail_w * bev.blur(aperture, tail_sigma)) * sparing)
        dd = _depth_dose(density, angle, grid, plan, footprint)
        dd_rows = dd[at]
        for t, fluence in enumerate(fluences):
            summed[:, t] += bev.sample_at(fluence, at) * dd_rows
        beams.append((bev, fluences, dd, dd_rows))

    # One weight per target: its beams together bring it near its prescription while the
    # OAR rows pull towards zero.
    goal = np.where(rows["target"], rows["goal"], 0.0)
    x, _ = nnls(summed * rows["nnls_weight"][:, None], goal * rows["nnls_weight"])
    maps = [sum(x[t] * fl for t, fl in enumerate(fluences)) for _, fluences, _, _ in beams]
    start = [m.copy() for m in maps]
    # The modulation sees the scatter through a per-voxel factor taken from the first plan.
    primary = _full_dose(maps, beams, hu.shape)
    scatter = np.clip(_scatter(primary, grid, plan)[at] / np.maximum(primary[at], 1e-3), 0.3, 3.0)
    for _ in range(plan["iterations"]):
        parts = [bev.sample_at(m, at) * dd_rows for m, (bev, _, _, dd_rows) in zip(maps, beams)]
        dose = np.maximum(sum(parts) * scatter, 1e-3)
        ratio = np.where(rows["target"], rows["goal"] / dose, np.minimum(1.0, rows["goal"] / dose))
        ratio = np.clip(ratio, 0.5, 2.0)
        # Cold target voxels count double: coverage first, as planners do.
        weight = rows["weight"] * np.where(rows["target"] & (ratio > 1.0), 2.0, 1.0)
        for b, (bev, _, _, _) in enumerate(beams):
            modulated = maps[b] * bev.modulation(at, parts[b] * weight, ratio)
            maps[b] = np.clip(modulated, 0.25 * start[b], 3.0 * start[b])
    dose = _scatter(_full_dose(maps, beams, hu.shape), grid, plan)
    mean70 = float(dose[structures["PTV70"]].mean())
    return dose * np.float32(PRESCRIPTION_GY["PTV70"] * plan["norm"] / mean70)


def _full_dose(maps: list[np.ndarray], beams: list[tuple], shape: tuple) -> np.ndarray:
    """Primary dose on the whole grid: each beam's fluence map times its depth dose."""
    dose = np.zeros(shape, dtype=np.float32)
    for fmap, (bev, _, dd, _) in zip(maps, beams):
        dose += bev.sample_all(fmap) * dd
    return dose


def _scatter(dose: np.ndarray, grid: int, plan: dict) -> np.ndarray:
    """Mix in a Gaussian-blurred copy: scattered dose, smooth and isotropic."""
    share, sigma_mm = plan["scatter"]
    sigma = [sigma_mm / v for v in voxel_mm(grid)]
    return (1 - share) * dose + share * ndimage.gaussian_filter(dose, sigma, mode="constant",
                                                                truncate=3.0)


def _rows(structures: dict[str, np.ndarray], targets: list[str], oars: dict[str, np.ndarray],
          plan: dict) -> dict[str, np.ndarray]:
    """Voxels the plan is optimised on: a strided subset of each target (goal: its
    prescription) and of each spared OAR outside the targets (goal: its tolerance). NNLS
    weights give each target the same total weight and the OARs less, pulling towards zero."""
    index, goal, target, weight, nnls_weight = [], [], [], [], []
    for name in targets + list(oars):
        idx = _thin(np.flatnonzero(structures[name] if name in targets else oars[name]), 1500)
        if not len(idx):
            continue
        is_target = name in targets
        tol, importance = (PRESCRIPTION_GY[name], 1.0) if is_target else _OAR_TOLERANCE[name]
        index.append(idx)
        goal.append(np.full(len(idx), tol))
        target.append(np.full(len(idx), is_target))
        weight.append(np.full(len(idx), importance))
        nnls_weight.append(np.full(len(idx), (1.0 if is_target else plan["oar_weight"])
                                   / np.sqrt(len(idx))))
    return {"index": np.concatenate(index), "goal": np.concatenate(goal),
            "target": np.concatenate(target), "weight": np.concatenate(weight),
            "nnls_weight": np.concatenate(nnls_weight)}


def _thin(idx: np.ndarray, most: int) -> np.ndarray:
    """An evenly strided subset of at most `most` indices (deterministic, no random draws)."""
    return idx if len(idx) <= most else idx[np.linspace(0, len(idx) - 1, most).astype(int)]
