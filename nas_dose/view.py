"""A conditioned model's preference sliders in a web page: one self-contained file, or live.

  nasdose view MODEL --data DATA.h5 --out PAGE.html [--patient ID] [--steps N] [key=value ...]
  nasdose view MODEL --data DATA.h5 [--port P] [--patient ID] [key=value ...]

MODEL is a conditioned training run (`model.conditioning`), its checkpoint, or an ensemble .yaml
of conditioned members (the cheapest to run is a distilled student; docs/how-to/preferences.md).
The page gets one slider per preference the model takes (oar, hi, ...). Moving them shows an
axial dose slice of the patient over its CT with the contours of its structures, the cumulative
DVHs of its targets and OARs, and the PTV70 homogeneity index and the structures' mean doses.

With `--out` the page is one file that needs no server and no network: its script is inline, and
the doses are in it as data (8-bit levels of the slice, DVH curves), predicted once on a grid of
`steps` values per preference (steps^P forward passes); the sliders show the nearest grid setting.

Without `--out` the page is served live (`serve`): one process, a standard-library HTTP server
bound to 127.0.0.1 only, on `port` (0: a free one; the URL is printed; Ctrl-C stops it). The
same page, with the slice and contours embedded, asks the server's `point` endpoint
(`/point?oar=0.37&hi=0.12`) for each slider setting; the server predicts it with the model on
demand (any value in the preference's documented range; others are refused with HTTP 400 and a
one-line reason), one prediction at a time, and keeps the answers of the last `CACHE` (512) settings.

Each slider runs from the lowest to the highest value of the data set's preference plans (`span:
plans`; the documented range where the data set holds none, or with `span: range`). A model that
is not conditioned on preferences is refused (it has no sliders).

Config keys: `patient` (default: the data set's first patient), `steps` (default 5; static page
only), `slice` (the axial index; default through the PTV70's centroid), `span`, `port` (live
only), `runtime`.
"""
from __future__ import annotations

import base64
import itertools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Sequence
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from torch import nn

from .config import ConfigError, at_least
from .data.patient import OARS, ROIS, TARGETS, Patient
from .data.preferences import PREFERENCES, check, homogeneity_index, parse
from .data.store import DataFile
from .errors import NasDoseError, input_error
from .inference import conditioned_on, load_model_or_ensemble, open_for, predict_patient
from .io import output_file, refuse_existing, write_text
from .models.conditioning import Preset
from .plots import BODY_HU, CT_OFFSET, CT_WINDOW_HU, DOSE_CMAP, ROI_COLORS, axial_centre, crop_box, cumulative_dvh
from .progress import progress, say
from .runtime import Runtime, RuntimeConfig

FORMAT = "nasdose-view"
VERSION = 2  # 2: `live` (the point endpoint, or null for a page holding its points)
DVH_BINS = 120  # points of each DVH curve
CACHE = 512  # settings a live server keeps the answer of (a 128³ slice and its DVHs: ~30 kB each)
TEXT = "text/plain; charset=utf-8"  # the live server's refusals: one line
LIVE_HEADROOM = 1.1  # a live page's dose scale: the highest dose at the sliders' corners times this


@dataclass
class Config:
    """`patient`: None takes the data set's first; `steps`: values per preference (>= 2) of a
    static page; `slice`: the axial slice shown (None: through the PTV70's centroid); `span`: each
    slider from the lowest to the highest value of the data set's preference plans ("plans") or
    over the preference's documented range ("range"); `port`: the live server's (0: a free one)."""

    patient: str | None = None
    steps: int = 5
    slice: int | None = None
    span: Literal["plans", "range"] = "plans"
    port: int = 0
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        at_least("steps", self.steps, 2)
        if self.slice is not None:
            at_least("slice", self.slice, 0)
        if self.span not in ("plans", "range"):
            raise ConfigError(f"config key 'span': plans or range, got {self.span!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"config key 'port': 0 (a free one) to 65535, got {self.port}")


@dataclass(frozen=True)
class Inputs:
    model: Path  # a conditioned run folder, checkpoint or ensemble .yaml
    data: Path  # a nasdose data set


@dataclass
class Viewed:
    """What both pages start from: the model on the runtime's device, its preferences, the patient
    and each slider's ends."""

    model: nn.Module
    names: tuple[str, ...]
    patient: Patient
    spans: list[tuple[float, float]]
    runtime: Runtime

    def predict(self, values: Sequence[float]) -> np.ndarray:
        """The patient's dose (Gy) asked for `values` (in `names` order)."""
        return predict_patient(Preset(self.model, list(values)).to(self.runtime.device), self.patient, self.runtime)


def _open(config: Config, inputs: Inputs, data: DataFile) -> Viewed:
    """The model (refused unless conditioned), the patient and the sliders' ends."""
    if data.kind != "dataset":
        raise input_error(inputs.data, "is a prediction file, not a data set")
    model = load_model_or_ensemble(inputs.model, data.grid, data.extra_channels)
    names = conditioned_on(model)
    if not names:
        raise input_error(inputs.model, "is not conditioned on preferences (trained without model.conditioning): "
                                        "there are no sliders to show")
    pid = config.patient if config.patient is not None else data.ids()[0]
    if pid not in data:
        raise input_error(inputs.data, f"no patient {pid!r}")
    runtime = Runtime(config.runtime)
    return Viewed(runtime.prepare(model).eval(), names, data.read(pid),
                  [_span(data, name, config.span) for name in names], runtime)


def run(config: Config, inputs: Inputs, out: Path, resume: bool = False, *, force: bool = False) -> dict[str, Any]:
    """Predict the grid of settings for one patient and write the page to `out` (an .html file);
    returns the page's data. An existing page is replaced only with `force`."""
    with output_file(out), open_for(inputs.data, inputs.model) as data:
        refuse_existing([out], force)
        viewed = _open(config, inputs, data)
        axes = [np.linspace(lo, hi, config.steps) for lo, hi in viewed.spans]
        settings = list(itertools.product(*axes))
        doses = [viewed.predict(values) for values in progress(settings, desc="settings")]
        frame = Frame(viewed.patient, doses, config.slice)
        page = frame.page(viewed.names, axes, str(inputs.model),
                          points=[frame.point(values, dose) for values, dose in zip(settings, doses)])
        write_text(out, render(page))
    say(f"wrote {out}: {len(doses)} settings of {', '.join(viewed.names)} for patient {viewed.patient.id} "
        "(open it in a browser)")
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


class Frame:
    """The slice a page shows and its scales, fixed for every setting: the axial index (through
    the PTV70's centroid unless `slice_index`), the crop to the body and to where `doses` (the
    settings known when the page is made) are non-zero, the dose scale (their highest dose times
    `headroom`; above it a slice saturates) and the DVH bins."""

    def __init__(self, patient: Patient, doses: Sequence[np.ndarray], slice_index: int | None,
                 headroom: float = 1.0) -> None:
        ptv70 = patient.structures.get("PTV70")
        z = slice_index if slice_index is not None else axial_centre(ptv70) if ptv70 is not None else None
        z = patient.ct.shape[2] // 2 if z is None else z
        if not 0 <= z < patient.ct.shape[2]:
            raise ConfigError(f"config key 'slice': {z} is outside 0..{patient.ct.shape[2] - 1}")
        self.patient, self.z = patient, int(z)
        self.hu = patient.ct[:, :, z].astype(np.float64) - CT_OFFSET
        self.box = crop_box(self.hu > BODY_HU, *(d[:, :, z] for d in doses))
        self.top = max(max(float(d.max()) for d in doses), 1e-6) * headroom
        self.bins = np.linspace(0.0, self.top * 1.02, DVH_BINS)
        self.rois = [r for r in ROIS if r in patient.structures and patient.structures[r].any()]
        self.ptv70 = ptv70 if ptv70 is not None and ptv70.any() else None

    def point(self, values: Sequence[float], dose: np.ndarray) -> dict[str, Any]:
        """One setting as the page draws it: its dose slice, DVH curves and summary numbers."""
        structures = self.patient.structures
        return {
            "values": [float(v) for v in values],
            "dose": _levels(dose[:, :, self.z][self.box], self.top),
            "dvh": {r: np.round(cumulative_dvh(dose, structures[r], self.bins), 2).tolist() for r in self.rois},
            "hi": None if self.ptv70 is None else round(homogeneity_index(dose, self.ptv70), 4),
            "mean_gy": {r: round(float(dose[structures[r]].mean()), 3) for r in self.rois},
        }

    def page(self, names: Sequence[str], axes: Sequence[Sequence[float] | np.ndarray], model: str, *,
             points: list[dict[str, Any]] | None = None, live: str | None = None) -> dict[str, Any]:
        """What the page shows, as plain data: the CT slice, contours, the sliders (`axes`: each
        preference's values, the grid of `points` in `itertools.product` order; live, its ends)
        and either the points or the `live` endpoint that answers one for any setting."""
        grey = np.clip((self.hu[self.box] - CT_WINDOW_HU[0]) / (CT_WINDOW_HU[1] - CT_WINDOW_HU[0]), 0, 1)
        cmap = colormaps[DOSE_CMAP]
        return {
            "format": FORMAT, "version": VERSION, "model": model, "patient": self.patient.id, "slice": self.z,
            "preferences": [{"name": n, "values": [float(v) for v in a], "meaning": PREFERENCES[n][2]}
                            for n, a in zip(names, axes)],
            "shape": list(grey.shape), "ct": _levels(grey, 1.0), "dose_max_gy": self.top,
            "colormap": [to_hex(cmap(i / 255)) for i in range(256)],
            "contours": {r: {"color": to_hex(ROI_COLORS[r]), "target": r in TARGETS, "oar": r in OARS,
                             "mask": _base64(self.patient.structures[r][:, :, self.z][self.box])} for r in self.rois},
            "bins_gy": np.round(self.bins, 3).tolist(), "points": points or [], "live": live,
        }


class Live:
    """A conditioned model's answer for any setting of one patient, predicted on demand, one at a
    time (a conditioned network's forward is not reentrant), the last `CACHE` kept."""

    def __init__(self, viewed: Viewed, slice_index: int | None) -> None:
        self.viewed = viewed
        corners = list(itertools.product(*viewed.spans))
        doses = [viewed.predict(values) for values in corners]
        self.frame = Frame(viewed.patient, doses, slice_index, LIVE_HEADROOM)
        self.lock = threading.Lock()
        self.cache: OrderedDict[tuple[float, ...], bytes] = OrderedDict()
        for values, dose in zip(corners, doses):
            self._keep(tuple(values), dose)

    def _keep(self, key: tuple[float, ...], dose: np.ndarray) -> bytes:
        body = json.dumps(self.frame.point(key, dose), separators=(",", ":")).encode()
        self.cache[key] = body
        while len(self.cache) > CACHE:
            self.cache.popitem(last=False)
        return body

    def answer(self, query: str) -> bytes:
        """The point (JSON) for a query `oar=0.37&hi=0.12`: every preference the model takes, once,
        each a number in its documented range (else a NasDoseError saying why, in one line)."""
        names = self.viewed.names
        values = parse(",".join(f"{k}={v}" for k, v in parse_qsl(query, keep_blank_values=True)))
        other = sorted(set(values) - set(names))
        if other:
            raise NasDoseError(f"preference {other[0]!r}: the model takes {', '.join(names)}")
        check(values, names)
        key = tuple(float(values[n]) for n in names)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
            return self._keep(key, self.viewed.predict(key))


class _Handler(BaseHTTPRequestHandler):
    """GET / (the page), GET /point?NAME=VALUE&... (one setting's point, JSON); nothing else."""

    server: ViewServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.server.html)
        elif url.path == "/point":
            try:
                body = self.server.live.answer(url.query)
            except NasDoseError as e:
                self._send(400, TEXT, f"{e}\n".encode())
            else:
                self._send(200, "application/json", body)
        else:
            self._send(404, TEXT, f"no {url.path} here: / is the page, /point a setting\n".encode())

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a slider's move is not worth a line."""


class ViewServer(ThreadingHTTPServer):
    """The live page's server, on 127.0.0.1 only."""

    daemon_threads = True

    def __init__(self, port: int, live: Live, model: str) -> None:
        try:
            super().__init__(("127.0.0.1", port), _Handler)
        except OSError as e:
            raise NasDoseError(f"view: cannot listen on 127.0.0.1:{port}: {e.strerror or e}") from None
        self.live = live
        viewed = live.viewed
        page = live.frame.page(viewed.names, viewed.spans, model, live="point")
        self.html = render(page).encode()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


def open_server(config: Config, inputs: Inputs) -> ViewServer:
    """The live server for one patient, listening, not yet serving (`serve_forever` does)."""
    with open_for(inputs.data, inputs.model) as data:
        viewed = _open(config, inputs, data)
    return ViewServer(config.port, Live(viewed, config.slice), str(inputs.model))


def serve(config: Config, inputs: Inputs) -> None:
    """Serve the live page until Ctrl-C; its URL is printed (even when quiet: it is the output)."""
    server = open_server(config, inputs)
    names = ", ".join(server.live.viewed.names)
    print(f"nasdose view: {server.url} (sliders {names} for patient {server.live.viewed.patient.id}; "
          "Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("stopped")
    finally:
        server.server_close()


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
<div><canvas id="slice"></canvas><br><small id="slice-note"></small><br><small id="status"></small></div>
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
                    value: D.live ? (lo + hi) / 2 : p.values[Math.floor(p.values.length / 2)]});
  const shown = document.createElement("span"); shown.id = "shown-" + p.name;
  s.addEventListener("input", update);
  controls.append(label, s, shown); sliders.push([p, s, shown]);
});
function nearest(values, v) {
  let best = 0;
  values.forEach((x, i) => { if (Math.abs(x - v) < Math.abs(values[best] - v)) best = i; });
  return best;
}
function pointIndex() {  // a static page: the precomputed setting nearest to the sliders
  let index = 0;
  sliders.forEach(([p, s]) => { index = index * p.values.length + nearest(p.values, parseFloat(s.value)); });
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
function show(point, key) {
  sliders.forEach(([p, s, shown], i) => {
    shown.textContent = `asked ${parseFloat(s.value).toFixed(2)}, shown ${point.values[i].toFixed(2)}`;
  });
  document.body.dataset.point = key;
  drawSlice(point); drawDVH(point); drawStats(point);
}
let busy = false, again = false;
async function ask() {  // a live page: the server predicts the sliders' setting
  const status = document.getElementById("status");
  const query = sliders.map(([p, s]) => {
    const lo = p.values[0], hi = p.values[p.values.length - 1];
    return `${p.name}=${Math.min(hi, Math.max(lo, parseFloat(s.value)))}`;
  }).join("&");
  try {
    const response = await fetch(`${D.live}?${query}`);
    if (!response.ok) { status.textContent = await response.text(); return; }
    const point = await response.json();
    status.textContent = "";
    show(point, query);
  } catch (e) {
    status.textContent = `the server does not answer (${e.message}): is nasdose view still running?`;
  }
}
async function update() {
  if (!D.live) { const index = pointIndex(); show(D.points[index], index); return; }
  if (busy) { again = true; return; }  // one request at a time; the latest setting is asked next
  busy = true;
  do { again = false; await ask(); } while (again);
  busy = false;
}
document.getElementById("legend").innerHTML = Object.entries(D.contours).map(
  ([n, c]) => `<span style="background:${c.color}"></span>${n} `).join(" ");
update();
</script></body></html>
"""
