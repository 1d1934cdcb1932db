"""The phantom's plan: coplanar parallel beams with beam's-eye-view apertures, a depth dose over
the radiological depth, target weights by non-negative least squares, fluence modulation that
spares the organs at risk, and a scatter blur.

Two optional plan entries set the planner's trade-off (`nas_dose.data.preferences`): ``oar``
(0 to 1, absent: 0.5) scales how hard the OARs are spared (fluence cut, optimisation weights,
tolerances), and ``hi_goal`` (absent: 0) paints the targets' goal from cooler edges to a hotter
core, so the plan's homogeneity index rises with it."""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.optimize import nnls

from ..patient import PRESCRIPTION_GY, TARGETS
from .anatomy import voxel_mm

# Spared OARs: voxel dose (Gy) above which the fluence optimisation pushes back, and how hard
# (relative to a target). The mandible is not spared, as in most plans.
_OAR_TOLERANCE = {"Brainstem": (50.0, 0.5), "SpinalCord": (38.0, 2.0),
                  "RightParotid": (24.0, 0.3), "LeftParotid": (24.0, 0.3),
                  "Esophagus": (40.0, 0.2), "Larynx": (40.0, 0.2)}
_FINE_MM = 2.0  # bin width of the beam's-eye-view fluence maps
MIN_DOSE_GY = 0.05  # below this the plan's dose grid is treated as empty


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
    nonzero = np.asarray(rows.any(axis=1))
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


def plan_dose(coords: tuple, grid: int, hu: np.ndarray, structures: dict[str, np.ndarray],
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
    footprint = np.asarray((density > 0).any(axis=2))  # in-plane pixels where the patient is

    beams = []
    summed = np.zeros((len(rows["index"]), len(targets)))  # each target's beams, equal weights
    tail_w, tail_sigma = plan["tail"]
    strength = _sparing(plan)
    cut_out, cut_in = (min(0.95, cut * strength) for cut in plan["spare"])
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


def beam_plate(coords: tuple, grid: int, structures: dict[str, np.ndarray], plan: dict) -> np.ndarray:
    """The plan's beam arrangement as an input volume (`nasdose data synth --beam-plates`): each
    beam's aperture around all targets, with the plan's margin, penumbra and tail, carried along
    its rays, averaged over the beams (0 to 1). A planner knows it before any dose exists; no
    fluence optimisation or depth dose is in it."""
    targets = np.logical_or.reduce([structures[t] for t in TARGETS if t in structures])
    around = np.nonzero(targets)
    tail_w, tail_sigma = plan["tail"]
    plate = np.zeros(targets.shape, np.float32)
    for angle in plan["angles"]:
        bev = _BeamsEye(coords, grid, angle, around, plan["margin_mm"] + 3 * max(plan["penumbra_mm"], tail_sigma))
        aperture = bev.dilate(bev.project(around), plan["margin_mm"])
        fluence = (1 - tail_w) * bev.blur(aperture, plan["penumbra_mm"]) + tail_w * bev.blur(aperture, tail_sigma)
        plate += bev.sample_all(fluence)
    return np.clip(plate / np.float32(len(plan["angles"])), 0.0, 1.0)


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
    strength = _sparing(plan)
    for name in targets + list(oars):
        idx = _thin(np.flatnonzero(structures[name] if name in targets else oars[name]), 1500)
        if not len(idx):
            continue
        is_target = name in targets
        if is_target:
            tol = PRESCRIPTION_GY[name] * (1.0 + plan.get("hi_goal", 0.0) * _depth_rank(structures[name], idx))
            importance, pull = 1.0, 1.0
        else:
            tol, importance = _OAR_TOLERANCE[name]
            # Sparing 1 (oar = 0.5) is the usual plan: harder sparing lowers the tolerance too.
            tol, importance, pull = tol * (1.5 - strength / 2), importance * strength, plan["oar_weight"] * strength
        index.append(idx)
        goal.append(np.broadcast_to(tol, idx.shape).astype(float))
        target.append(np.full(len(idx), is_target))
        weight.append(np.full(len(idx), importance))
        nnls_weight.append(np.full(len(idx), pull / np.sqrt(len(idx))))
    return {"index": np.concatenate(index), "goal": np.concatenate(goal),
            "target": np.concatenate(target), "weight": np.concatenate(weight),
            "nnls_weight": np.concatenate(nnls_weight)}


def _sparing(plan: dict) -> float:
    """The OAR-sparing factor: 2 * oar, so 1 is the usual plan (oar = 0.5)."""
    return 2.0 * float(plan.get("oar", 0.5))


def _depth_rank(mask: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Each voxel's rank by depth inside the mask (distance to its edge), from -0.5 at the
    edge to 0.5 at the core: a goal scaled by 1 + h * rank spans about h of the prescription."""
    depth = ndimage.distance_transform_edt(mask).ravel()[idx]
    order = np.argsort(np.argsort(depth, kind="stable"), kind="stable")
    return order / max(len(idx) - 1, 1) - 0.5


def _thin(idx: np.ndarray, most: int) -> np.ndarray:
    """An evenly strided subset of at most `most` indices (deterministic, no random draws)."""
    return idx if len(idx) <= most else idx[np.linspace(0, len(idx) - 1, most).astype(int)]
