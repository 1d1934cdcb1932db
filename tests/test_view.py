"""`nasdose view`: a conditioned model's preference sliders as one self-contained HTML page, or
served live from 127.0.0.1. The page's embedded data and the live server's answers (at settings
off any grid) are checked against the model's own predictions, the server's refusals are one
line with HTTP 400, and a headless Chromium (driven through chromedriver's WebDriver HTTP
protocol, no Python package needed) moves a slider on either page and sees the slice and the DVHs
change; those tests skip where Chromium is absent."""
from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nas_dose import cli
from nas_dose import view as viewer
from nas_dose.config import load_config
from nas_dose.data.store import open_data
from nas_dose.inference import predict_patient
from nas_dose.io import load_checkpoint, save_checkpoint
from nas_dose.models.conditioning import FiLMNorm, Preset
from nas_dose.models.factory import build_model, load_model
from nas_dose.runtime import Runtime, RuntimeConfig, seed_everything
from nas_dose.training import TrainConfig, train_model

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def conditioned(plan_data, tmp_path_factory) -> Path:
    """A tiny conditioned U-Net, trained 2 epochs; its FiLM heads then given weights large enough
    that every setting gives a visibly different dose (a few steps leave them near zero)."""
    cfg = load_config(TrainConfig, overrides=["model.kwargs.widths=[4, 8, 16]", "runtime.device=cpu",
                                              "runtime.threads=1", "epochs=2", "model.conditioning=film",
                                              "data.plans=true", "data.augment.enabled=false"])
    seed_everything(0)
    out = tmp_path_factory.mktemp("runs") / "conditioned"
    train_model(build_model(cfg.model), cfg, plan_data, out)
    model, _ = load_model(out)
    torch.manual_seed(3)
    for m in model.modules():
        if isinstance(m, FiLMNorm):
            torch.nn.init.normal_(m.film.weight, std=0.5)
    save_checkpoint(out / "best.pt", {**load_checkpoint(out / "best.pt"), "model": model.state_dict()})
    return out


def view(*argv: object) -> int:
    return cli.main(["view", *map(str, argv), "-q", "runtime.device=cpu", "runtime.threads=1"])


def embedded(page: Path) -> dict[str, Any]:
    """The page's data, as its script reads it."""
    return embedded_text(page.read_text())


def embedded_text(html: str) -> dict[str, Any]:
    found = re.search(r'<script id="view-data" type="application/json">(.*?)</script>', html, re.S)
    assert found is not None
    return json.loads(found.group(1))


def levels(text: str, shape: list[int]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(shape)


@pytest.fixture(scope="module")
def page(conditioned, plan_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("view") / "page.html"
    assert view(conditioned, "--data", plan_data, "--out", out, "--patient", "pt_7", "--steps", 3) == 0
    return out


def test_the_page_holds_every_setting_as_the_model_predicts_it(page, conditioned, plan_data):
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script src" not in text  # self-contained
    data = embedded(page)
    assert data["format"] == "nasdose-view" and data["patient"] == "pt_7"
    prefs = data["preferences"]
    assert [p["name"] for p in prefs] == ["oar", "hi"] and all(len(p["values"]) == 3 for p in prefs)
    with open_data(plan_data) as d:
        planned = np.concatenate([d.plan_preferences(pid)[1] for pid in d.ids()])
        patient = d.read("pt_7")
    for i, p in enumerate(prefs):  # the sliders span the data set's plans
        assert p["values"][0] == pytest.approx(planned[:, i].min(), abs=1e-6)
        assert p["values"][-1] == pytest.approx(planned[:, i].max(), abs=1e-6)
    points = data["points"]
    assert len(points) == 9
    assert points[5]["values"] == [prefs[0]["values"][1], prefs[1]["values"][2]]  # product order
    shape = data["shape"]
    slices = [levels(p["dose"], shape) for p in points]
    assert len({s.tobytes() for s in slices}) == 9  # every setting shows its own dose
    assert levels(data["ct"], shape).max() > 0
    rois = set(data["contours"])
    ptv70 = levels(data["contours"]["PTV70"]["mask"], shape)  # the slice through its centroid, cropped to the body
    assert {"PTV70", "SpinalCord"} <= rois and set(np.unique(ptv70)) == {0, 1}
    assert ptv70.sum() == patient.structures["PTV70"][:, :, data["slice"]].sum()
    model, _ = load_model(conditioned)
    dose = predict_patient(Preset(model, points[5]["values"]), patient, Runtime(RuntimeConfig(device="cpu")))
    for roi, mean in points[5]["mean_gy"].items():
        assert mean == pytest.approx(float(dose[patient.structures[roi]].mean()), abs=2e-3)
    z = data["slice"]
    top = data["dose_max_gy"]
    assert top >= dose.max() - 1e-4
    np.testing.assert_allclose(slices[5].max() / 255 * top, dose[:, :, z].max(), atol=top / 255)
    for curve in points[5]["dvh"].values():  # cumulative DVHs: from 100 % down, never rising
        assert curve[0] == pytest.approx(100) and np.all(np.diff(curve) <= 1e-9) and set(points[5]["dvh"]) == rois


def test_a_plain_model_is_refused_in_one_line(plan_data, train_tiny, tmp_path, capsys):
    plain = train_tiny(plan_data, tmp_path / "plain")
    capsys.readouterr()
    assert view(plain, "--data", plan_data, "--out", tmp_path / "page.html") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not conditioned" in err and str(plain) in err
    assert not (tmp_path / "page.html").exists()


def test_an_existing_page_needs_force(page, conditioned, plan_data, capsys):
    capsys.readouterr()
    assert view(conditioned, "--data", plan_data, "--out", page, "--steps", 2) == 1
    assert "--force" in capsys.readouterr().err
    assert len(embedded(page)["points"]) == 9


class WebDriver:
    """The few W3C WebDriver calls the test needs, over chromedriver's HTTP interface."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, url: str) -> None:
        self.url = url
        caps = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": str(CHROMIUM), "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                              "--window-size=1200,800"]}}
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(self.url + path, method=method, headers={"Content-Type": "application/json"},
                                         data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["value"]

    def __call__(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.call(method, f"/session/{self.session}{path}", body)

    def script(self, code: str) -> Any:
        return self("POST", "/execute/sync", {"script": code, "args": []})


@pytest.fixture
def browser():
    if not CHROMIUM.exists() or CHROMEDRIVER is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/status", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        web = WebDriver(url)
        yield web
        web("DELETE", "")
    finally:
        driver.terminate()
        driver.wait(10)


def test_moving_a_slider_in_chromium_changes_the_slice_and_the_dvh(page, browser):
    browser("POST", "/url", {"url": page.as_uri()})
    state = ("return [document.body.dataset.point, document.getElementById('slice').toDataURL(), "
             "[...document.querySelectorAll('.dvh-curve')].map(c => c.getAttribute('points')).join(';'), "
             "document.getElementById('shown-oar').textContent]")
    point, image, curve, shown = browser.script(state)
    assert point == "4" and image.startswith("data:image/png") and "shown" in shown  # the middle setting
    slider = browser("POST", "/element", {"using": "css selector", "value": "#pref-oar"})[WebDriver.ELEMENT]
    browser("POST", f"/element/{slider}/value", {"text": "\ue014" * 60})  # ArrowRight, as a user would
    moved = browser.script(state)
    assert moved[0] == "7"  # oar at its highest precomputed value, hi unchanged
    assert moved[1] != image and moved[2] != curve and moved[3] != shown


@pytest.fixture(scope="module")
def live(conditioned, plan_data):
    """The live server for pt_7, serving in a thread."""
    config = viewer.Config(patient="pt_7", runtime=RuntimeConfig(device="cpu", threads=1))
    server = viewer.open_server(config, viewer.Inputs(conditioned, plan_data))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_live_server_predicts_any_setting_on_localhost(live, conditioned, plan_data):
    assert live.server_address[0] == "127.0.0.1" and live.url.startswith("http://127.0.0.1:")
    status, html = get(live.url)
    assert status == 200 and b'"live":"point"' in html and b"http://" not in html
    with open_data(plan_data) as d:
        patient = d.read("pt_7")
    values = [0.37, 0.123]  # between the grid points of any page
    status, body = get(f"{live.url}point?oar={values[0]}&hi={values[1]}")
    assert status == 200
    point = json.loads(body)
    assert point["values"] == values
    model, _ = load_model(conditioned)
    dose = predict_patient(Preset(model, values), patient, Runtime(RuntimeConfig(device="cpu")))
    page = embedded_text(html.decode())
    top, z, shape = page["dose_max_gy"], page["slice"], page["shape"]
    assert page["points"] == [] and [p["name"] for p in page["preferences"]] == ["oar", "hi"]
    shown = levels(point["dose"], shape).astype(int)
    expected = np.clip(np.round(dose[:, :, z][live.live.frame.box] / top * 255), 0, 255)
    assert shown.max() > 0 and np.abs(shown - expected).max() <= 1  # float32 rounding on the level's edge
    for roi, mean in point["mean_gy"].items():
        assert mean == pytest.approx(float(dose[patient.structures[roi]].mean()), abs=2e-3)
    other = json.loads(get(f"{live.url}point?oar=0.9&hi=0.123")[1])
    assert other["mean_gy"] != point["mean_gy"]
    assert get(f"{live.url}point?hi={values[1]}&oar={values[0]}")[1] == body  # any order; kept


@pytest.mark.parametrize("query, reason", [
    ("oar=1.5&hi=0.1", "oar=1.5 is out of its range [0, 1]"),
    ("oar=0.5", "preference 'hi' not given"),
    ("oar=x&hi=0.1", "oar: 'x' is not a number"),
    ("oar=0.5&hi=0.1&oar=0.2", "'oar' given twice"),
    ("oar=0.5&hi=0.1&size=3", "unknown preference 'size'"),
])
def test_the_live_server_refuses_a_bad_setting_in_one_line(live, query, reason):
    status, body = get(f"{live.url}point?{query}")
    assert status == 400 and reason in body.decode() and len(body.decode().splitlines()) == 1


def test_the_live_server_serves_nothing_else(live):
    assert get(f"{live.url}data.h5")[0] == 404


def test_nasdose_view_without_out_serves_until_ctrl_c(conditioned, plan_data, monkeypatch, capsys, tmp_path):
    answered = []

    def serve_once(server):  # a browser asks for the page, then the user presses Ctrl-C
        thread = threading.Thread(target=server.handle_request)
        thread.start()
        answered.append(get(server.url)[0])
        thread.join(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(viewer.ViewServer, "serve_forever", serve_once)
    capsys.readouterr()
    assert view(conditioned, "--data", plan_data, "--port", 0) == 0
    out = capsys.readouterr().out
    assert answered == [200] and re.search(r"nasdose view: http://127\.0\.0\.1:\d+/ ", out)
    assert view(conditioned, "--data", plan_data, "port=70000") == 1
    assert "config key 'port'" in capsys.readouterr().err
    assert view(conditioned, "--data", plan_data, "--steps", 3) == 1  # only a written page has steps
    assert "--steps" in capsys.readouterr().err
    assert view(conditioned, "--data", plan_data, "--out", tmp_path / "p.html", "--port", 0) == 1
    assert "--port" in capsys.readouterr().err and not (tmp_path / "p.html").exists()


def test_moving_a_slider_in_chromium_asks_the_live_server(live, browser):
    browser("POST", "/url", {"url": live.url})
    state = ("return [document.body.dataset.point, document.getElementById('slice').toDataURL(), "
             "[...document.querySelectorAll('.dvh-curve')].map(c => c.getAttribute('points')).join(';'), "
             "document.getElementById('status').textContent]")

    def settled(before: str | None) -> list[Any]:
        for _ in range(300):
            now = browser.script(state)
            if now[0] is not None and now[0] != before:
                return now
            time.sleep(0.1)
        raise AssertionError(f"the page showed no new setting (status: {now[3]!r})")

    point, image, curve, status = settled(None)
    assert point.startswith("oar=") and status == "" and image.startswith("data:image/png")
    slider = browser("POST", "/element", {"using": "css selector", "value": "#pref-oar"})[WebDriver.ELEMENT]
    browser("POST", f"/element/{slider}/value", {"text": "\ue014" * 13})  # ArrowRight: off the 5-step grid
    asked = float(browser.script("return document.getElementById('pref-oar').value"))
    moved = settled(point)
    for _ in range(300):  # a loaded machine may first show a setting between the old and the asked one
        if float(re.search(r"oar=([0-9.e-]+)", moved[0]).group(1)) == pytest.approx(asked):
            break
        time.sleep(0.1)
        moved = browser.script(state)
    oar = float(re.search(r"oar=([0-9.e-]+)", moved[0]).group(1))
    assert oar == pytest.approx(asked)
    assert oar > float(re.search(r"oar=([0-9.e-]+)", point).group(1))
    assert moved[1] != image and moved[2] != curve and moved[3] == ""
