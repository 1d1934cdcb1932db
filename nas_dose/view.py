"""A conditioned model's preference sliders as one self-contained web page.

  nasdose view MODEL --data DATA.h5 --out PAGE.html [--patient ID] [--steps N] [key=value ...]

MODEL is a conditioned training run (`model.conditioning`), its checkpoint, or an ensemble .yaml
of conditioned members (the cheapest to run is a distilled student; docs/how-to/preferences.md).
PAGE.html gets one slider per preference the model takes (oar, hi, ...). Moving them shows, for
the precomputed setting nearest to the sliders, an axial dose slice of the patient over its CT
with the contours of its structures, the cumulative DVHs of its targets and OARs, and the
setting's PTV70 homogeneity index and OAR mean doses.

The page is one file that needs no server and no network: its script is inline, and the doses
are in it as data (8-bit levels of the slice, DVH curves). They are predicted once, when the page
is made, on a grid of `steps` values per preference (steps^P forward passes): each preference
from the lowest to the highest value of the data set's preference plans (`span: plans`; the
documented range where the data set holds none, or with `span: range`). A model that is not
conditioned on preferences is refused (it has no sliders).

Config keys: `patient` (default: the data set's first patient), `steps` (default 5), `slice`
(the axial index; default through the PTV70's centroid), `span`, `runtime`.
"""
from __future__ import annotations

import base64
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex

from .config import ConfigError, at_least
from .data.patient import OARS, ROIS, TARGETS, Patient
from .data.preferences import PREFERENCES, homogeneity_index
from .data.store import DataFile, open_data
from .errors import input_error
from .inference import conditioned_on, load_model_or_ensemble, predict_patient
from .io import output_file, refuse_existing, write_text
from .models.conditioning import Preset
from .plots import BODY_HU, CT_OFFSET, CT_WINDOW_HU, DOSE_CMAP, ROI_COLORS, axial_centre, crop_box, cumulative_dvh
from .progress import progress, say
from .runtime import Runtime, RuntimeConfig

FORMAT = "nasdose-view"
VERSION = 1
DVH_BINS = 120  # points of each DVH curve


@dataclass
class Config:
    """`patient`: None takes the data set's first; `steps`: values per preference (>= 2);
    `slice`: the axial slice shown (None: through the PTV70's centroid); `span`: each slider from
    the lowest to the highest value of the data set's preference plans ("plans") or over the
    preference's documented range ("range")."""

    patient: str | None = None
    steps: int = 5
    slice: int | None = None
    span: Literal["plans", "range"] = "plans"
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        at_least("steps", self.steps, 2)
        if self.slice is not None:
            at_least("slice", self.slice, 0)
        if self.span not in ("plans", "range"):
            raise ConfigError(f"config key 'span': plans or range, got {self.span!r}")


@dataclass(frozen=True)
class Inputs:
    model: Path  # a conditioned run folder, checkpoint or ensemble .yaml
    data: Path  # a nasdose data set


def run(config: Config, inputs: Inputs, out: Path, resume: bool = False, *, force: bool = False) -> dict[str, Any]:
    """Predict the grid of settings for one patient and write the page to `out` (an .html file);
    returns the page's data. An existing page is replaced only with `force`."""
    runtime = Runtime(config.runtime)
    with output_file(out), open_data(inputs.data) as data:
        refuse_existing([out], force)
        if data.kind != "dataset":
            raise input_error(inputs.data, "is a prediction file, not a data set")
        model = load_model_or_ensemble(inputs.model, data.grid)
        names = conditioned_on(model)
        if not names:
            raise input_error(inputs.model, "is not conditioned on preferences (trained without model.conditioning): "
                                            "there are no sliders to show")
        pid = config.patient if config.patient is not None else data.ids()[0]
        if pid not in data:
            raise input_error(inputs.data, f"no patient {pid!r}")
        patient = data.read(pid)
        axes = [np.linspace(*_span(data, name, config.span), config.steps) for name in names]
        model = runtime.prepare(model).eval()
        doses = [predict_patient(Preset(model, list(values)).to(runtime.device), patient, runtime)
                 for values in progress(list(itertools.product(*axes)), desc="settings")]
        page = page_data(patient, names, axes, doses, config.slice, str(inputs.model))
        write_text(out, render(page))
    say(f"wrote {out}: {len(doses)} settings of {', '.join(names)} for patient {pid} (open it in a browser)")
    return page


def _span(data: DataFile, name: str, span: str) -> tuple[float, float]:
    """The slider's ends: the data set's plans' lowest and highest value, or the documented range."""
    low, high, _ = PREFERENCES[name]
    planned = [pid for pid in data.ids() if data.n_plans(pid)] if span == "plans" else []
    if not planned:
        return low, high
    column = data.plan_preferences(planned[0])[0].index(name)
    values = np.concatenate([data.plan_preferences(pid)[1] for pid in planned])[:, column]
    lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (low, high)


def _levels(image: np.ndarray, top: float) -> str:
    """An image as base64 8-bit levels, 0..255 for 0..top."""
    return _base64(np.clip(np.round(np.asarray(image, dtype=np.float64) / top * 255), 0, 255))


def _base64(image: np.ndarray) -> str:
    """An image's pixels, row by row, one byte each, in base64 (what the page's `bytes` decodes)."""
    return base64.b64encode(image.astype(np.uint8).tobytes()).decode("ascii")


def page_data(patient: Patient, names: tuple[str, ...], axes: list[np.ndarray], doses: list[np.ndarray],
              slice_index: int | None, model: str) -> dict[str, Any]:
    """What the page shows, as plain data: the CT slice, contours, and per setting (in
    `itertools.product` order of `axes`) its dose slice, DVH curves and summary numbers."""
    ptv70 = patient.structures.get("PTV70")
    z = slice_index if slice_index is not None else axial_centre(ptv70) if ptv70 is not None else None
    z = patient.ct.shape[2] // 2 if z is None else z
    if not 0 <= z < patient.ct.shape[2]:
        raise ConfigError(f"config key 'slice': {z} is outside 0..{patient.ct.shape[2] - 1}")
    hu = patient.ct[:, :, z].astype(np.float64) - CT_OFFSET
    box = crop_box(hu > BODY_HU, *(d[:, :, z] for d in doses))
    grey = np.clip((hu[box] - CT_WINDOW_HU[0]) / (CT_WINDOW_HU[1] - CT_WINDOW_HU[0]), 0, 1)
    top = max(max(float(d.max()) for d in doses), 1e-6)
    bins = np.linspace(0.0, top * 1.02, DVH_BINS)
    rois = [r for r in ROIS if r in patient.structures and patient.structures[r].any()]
    cmap = colormaps[DOSE_CMAP]
    points = []
    for values, dose in zip(itertools.product(*axes), doses):
        points.append({
            "values": [float(v) for v in values],
            "dose": _levels(dose[:, :, z][box], top),
            "dvh": {r: np.round(cumulative_dvh(dose, patient.structures[r], bins), 2).tolist() for r in rois},
            "hi": None if ptv70 is None or not ptv70.any() else round(homogeneity_index(dose, ptv70), 4),
            "mean_gy": {r: round(float(dose[patient.structures[r]].mean()), 3) for r in rois},
        })
    return {
        "format": FORMAT, "version": VERSION, "model": model, "patient": patient.id, "slice": int(z),
        "preferences": [{"name": n, "values": [float(v) for v in a], "meaning": PREFERENCES[n][2]}
                        for n, a in zip(names, axes)],
        "shape": list(grey.shape), "ct": _levels(grey, 1.0), "dose_max_gy": top,
        "colormap": [to_hex(cmap(i / 255)) for i in range(256)],
        "contours": {r: {"color": to_hex(ROI_COLORS[r]), "target": r in TARGETS, "oar": r in OARS,
                         "mask": _base64(patient.structures[r][:, :, z][box])} for r in rois},
        "bins_gy": np.round(bins, 3).tolist(), "points": points,
    }


def render(page: dict[str, Any]) -> str:
    """The HTML page: the data as JSON in a script element, and the script that draws it."""
    data = json.dumps(page, separators=(",", ":")).replace("</", "<\\/")
    return HTML.replace("{{TITLE}}", f"nasdose view: {page['patient']}").replace("{{DATA}}", data)


HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
#controls{display:grid;grid-template-columns:auto 260px auto;gap:6px 12px;align-items:center;margin-bottom:12px}
#panels{display:flex;gap:20px;flex-wrap:wrap;align-items:flex-start}
canvas{image-rendering:pixelated;border:1px solid #ccc}
#dvh{border:1px solid #ccc;background:#fff}
table{border-collapse:collapse;font-size:12px}td,th{padding:1px 8px;text-align:right}
.legend span{display:inline-block;width:10px;height:10px;margin-right:4px}
small{color:#666}
</style></head><body>
<h3 id="title"></h3>
<div id="controls"></div>
<div id="panels">
<div><canvas id="slice"></canvas><br><small id="slice-note"></small></div>
<div><svg id="dvh" width="460" height="340"></svg><div class="legend" id="legend"></div></div>
<div><table id="stats"></table></div>
</div>
<script id="view-data" type="application/json">{{DATA}}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("view-data").textContent);
const [H, W] = D.shape, SCALE = Math.max(2, Math.floor(400 / Math.max(H, W)));
const bytes = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
const rgb = h => [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16));
const ct = bytes(D.ct), cmap = D.colormap.map(rgb);
const masks = Object.values(D.contours).map(c => [c.color, bytes(c.mask)]);
document.getElementById("title").textContent =
  `Patient ${D.patient}: ${D.model}, axial slice ${D.slice}`;
const controls = document.getElementById("controls"), sliders = [];
D.preferences.forEach((p, i) => {
  const lo = p.values[0], hi = p.values[p.values.length - 1];
  const label = document.createElement("label"); label.textContent = p.name; label.title = p.meaning;
  const s = document.createElement("input");
  Object.assign(s, {type: "range", id: "pref-" + p.name, min: lo, max: hi, step: (hi - lo) / 100,
                    value: p.values[Math.floor(p.values.length / 2)]});
  const shown = document.createElement("span"); shown.id = "shown-" + p.name;
  s.addEventListener("input", update);
  controls.append(label, s, shown); sliders.push([p, s, shown]);
});
function nearest(values, v) {
  let best = 0;
  values.forEach((x, i) => { if (Math.abs(x - v) < Math.abs(values[best] - v)) best = i; });
  return best;
}
function pointIndex() {
  let index = 0;
  sliders.forEach(([p, s, shown]) => {
    const k = nearest(p.values, parseFloat(s.value));
    shown.textContent = `asked ${parseFloat(s.value).toFixed(2)}, shown ${p.values[k].toFixed(2)}`;
    index = index * p.values.length + k;
  });
  return index;
}
function drawSlice(point) {
  const canvas = document.getElementById("slice");
  canvas.width = W * SCALE; canvas.height = H * SCALE;
  const small = document.createElement("canvas"); small.width = W; small.height = H;
  const g = small.getContext("2d"), img = g.createImageData(W, H), dose = bytes(point.dose);
  for (let i = 0; i < H * W; i++) {
    let c = [ct[i], ct[i], ct[i]];
    if (dose[i] > 2) { const m = cmap[dose[i]]; c = c.map((v, j) => 0.3 * v + 0.7 * m[j]); }
    img.data.set([c[0], c[1], c[2], 255], 4 * i);
  }
  g.putImageData(img, 0, 0);
  const ctx = canvas.getContext("2d"); ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, W * SCALE, H * SCALE);
  ctx.lineWidth = 2;
  for (const [color, m] of masks) {  // each contour: the pixel edges between inside and outside
    ctx.strokeStyle = color; ctx.beginPath();
    const inside = (r, c) => r >= 0 && r < H && c >= 0 && c < W && m[r * W + c];
    for (let r = 0; r < H; r++) for (let c = 0; c < W; c++) {
      if (!m[r * W + c]) continue;
      const x = c * SCALE, y = r * SCALE;
      if (!inside(r - 1, c)) { ctx.moveTo(x, y); ctx.lineTo(x + SCALE, y); }
      if (!inside(r + 1, c)) { ctx.moveTo(x, y + SCALE); ctx.lineTo(x + SCALE, y + SCALE); }
      if (!inside(r, c - 1)) { ctx.moveTo(x, y); ctx.lineTo(x, y + SCALE); }
      if (!inside(r, c + 1)) { ctx.moveTo(x + SCALE, y); ctx.lineTo(x + SCALE, y + SCALE); }
    }
    ctx.stroke();
  }
  document.getElementById("slice-note").textContent =
    `dose colour scale 0 to ${D.dose_max_gy.toFixed(1)} Gy (turbo); contours in their DVH colours`;
}
function drawDVH(point) {
  const svg = document.getElementById("dvh"), w = 460, h = 340, l = 44, b = 30, top = D.bins_gy.at(-1);
  const x = g => l + (w - l - 10) * g / top, y = v => (h - b) - (h - b - 10) * v / 100;
  let s = `<line x1="${l}" y1="${h - b}" x2="${w - 10}" y2="${h - b}" stroke="#888"/>` +
          `<line x1="${l}" y1="10" x2="${l}" y2="${h - b}" stroke="#888"/>`;
  const text = (x, y, t, anchor, extra = "") =>
    `<text x="${x}" y="${y}" font-size="10" text-anchor="${anchor}"${extra}>${t}</text>`;
  for (let g = 0; g <= top; g += 10) s += text(x(g), h - b + 14, g, "middle");
  for (let v = 0; v <= 100; v += 25) s += text(l - 4, y(v) + 3, v, "end");
  s += text(w / 2, h - 2, "dose (Gy)", "middle") +
       text(12, h / 2, "volume (%)", "middle", ` transform="rotate(-90 12 ${h / 2})"`);
  for (const [name, curve] of Object.entries(point.dvh)) {
    const pts = curve.map((v, i) => `${x(D.bins_gy[i]).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const dash = D.contours[name].target ? "" : ` stroke-dasharray="5,3"`;
    s += `<polyline class="dvh-curve" data-roi="${name}" fill="none" stroke="${D.contours[name].color}"` +
         ` stroke-width="1.6"${dash} points="${pts}"/>`;
  }
  svg.innerHTML = s;
}
function drawStats(point) {
  let rows = `<tr><th>structure</th><th>mean (Gy)</th></tr>`;
  const row = (name, v) => `<tr><td style="text-align:left">${name}</td><td>${v}</td></tr>`;
  for (const [name, v] of Object.entries(point.mean_gy)) rows += row(name, v.toFixed(2));
  if (point.hi !== null) rows += row("PTV70 HI", point.hi.toFixed(3));
  document.getElementById("stats").innerHTML = rows;
}
function update() {
  const index = pointIndex(), point = D.points[index];
  document.body.dataset.point = index;
  drawSlice(point); drawDVH(point); drawStats(point);
}
document.getElementById("legend").innerHTML = Object.entries(D.contours).map(
  ([n, c]) => `<span style="background:${c.color}"></span>${n} `).join(" ");
update();
</script></body></html>
"""
