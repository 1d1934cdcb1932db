"""The phantom's anatomy: body, organs at risk and targets as implicit functions of continuous
physical coordinates (mm from the grid centre, negative inside), drawn per patient; their masks
and a CT on a grid; the plan's hidden parameters."""
from __future__ import annotations

import numpy as np

from ..patient import OARS, OPENKBP_GRID, PRESCRIPTION_GY, TARGETS

BASE_VOXEL_MM = (3.906, 3.906, 2.5)
# Half extents (mm) of the physical field of view, the same at every grid.
_HALF_FOV = tuple(OPENKBP_GRID * v / 2 for v in BASE_VOXEL_MM)
# How often a contoured OAR is missing, roughly as in the OpenKBP training set.
_OAR_ABSENT_P = {"Brainstem": 0.04, "SpinalCord": 0.02, "RightParotid": 0.04,
                 "LeftParotid": 0.04, "Esophagus": 0.5, "Larynx": 0.35, "Mandible": 0.3}
# Primary tumour sites and how often each is drawn.
_SITES = ("oropharynx", "larynx", "nasopharynx", "oral_cavity", "neck_node")
_SITE_P = (0.4, 0.2, 0.15, 0.15, 0.1)
# Body outline along the patient's axial coordinate s (mm): AP half width, AP centre and
# right-left half width; the knots after the neck move with the drawn neck length.
_BODY_S = np.array([-150.0, -120, -90, -60, -35, -15, 0, 15])
_BODY_HAP = np.array([85.0, 102, 106, 104, 95, 85, 72, 64, 66, 82, 92, 95])
_BODY_AC = np.array([-12.0, -20, -24, -24, -24, -18, -10, -4, 0, 12, 18, 20])
_BODY_HLR = np.array([64.0, 76, 80, 78, 74, 70, 66, 62, 64, 150, 195, 205])


def voxel_mm(grid: int) -> tuple[float, float, float]:
    """Voxel size on `grid`: the OpenKBP voxel scaled so every grid spans the same volume."""
    f = OPENKBP_GRID / grid
    return tuple(float(v * f) for v in BASE_VOXEL_MM)  # type: ignore[return-value]


def axes(grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical voxel-centre coordinates (mm from the grid centre) along each axis."""
    return tuple((np.arange(grid) + 0.5) * v - h  # type: ignore[return-value]
                 for v, h in zip(voxel_mm(grid), _HALF_FOV))


def draw_anatomy(rng: np.random.Generator) -> dict:
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
    lobes: list[tuple[np.ndarray, list[float]]] = []
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


def draw_plan(rng: np.random.Generator) -> dict:
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


def structure_fields(an: dict, coords: tuple, voxel: float
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
    airway_a, airway_r = an["airway_r"]
    f["airway"] = _tube(p, air_a, 0.0, airway_a, airway_r, -45.0, 400.0)
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


def voxelize(fields: dict[str, np.ndarray], an: dict) -> dict[str, np.ndarray]:
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


def scatter_mask(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    full = np.zeros(where.shape, dtype=bool)
    full[where] = values
    return full


def hounsfield(f: dict[str, np.ndarray], an: dict, grid: int) -> np.ndarray:
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


def slab(s: np.ndarray, structures: dict[str, np.ndarray], plan: dict) -> np.ndarray:
    """Axial extent of the dose grid: the targets' extent plus a drawn margin each side."""
    slices = np.zeros(len(s), dtype=bool)
    for name in TARGETS:
        if name in structures:
            slices |= structures[name].any(axis=(0, 1))
    lo, hi = s[slices].min() - plan["slab_mm"][0], s[slices].max() + plan["slab_mm"][1]
    return ((s >= lo) & (s <= hi))[None, None, :]
