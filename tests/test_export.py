"""`nasdose export`: every reference model, a LENAS genotype, an ensemble and a cascade's stage
as ONNX graphs that give torch's output at two sizes (dynamic axes), model.yaml, torch.export
(as `nasdose distill --export` uses it), conditioned models with their preferences as a second
input, and bad input as one line."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nas_dose.cli import main
from nas_dose.config import ConfigError
from nas_dose.data.dataset import CHANNELS
from nas_dose.data.tta import flip_tta
from nas_dose.errors import NasDoseError
from nas_dose.export import COARSE_CHANNEL, Config, Inputs, export_model, run
from nas_dose.inference import save_ensemble
from nas_dose.io import load_yaml, save_checkpoint
from nas_dose.models import create_model, list_models, small_kwargs
from nas_dose.models.conditioning import FiLMNorm
from nas_dose.models.factory import CHECKPOINT_FORMAT, ModelConfig, model_from_spec, model_spec
from nas_dose.search_spaces import get_space, save_genotype


def importable(*names: str) -> bool:
    try:
        for name in names:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


needs_onnx = pytest.mark.skipif(not importable("onnx", "onnxruntime"),
                                reason="onnx and onnxruntime are not installed (the `export` extra)")
TWO_SIZES = Config(grid=16, check_grid=32)


def write_checkpoint(path: Path, spec: dict, seed: int = 0, config: dict | None = None) -> Path:
    """A trained-looking checkpoint of the model `spec` names (random weights, a conditioned
    model's FiLM heads too, so its preferences matter) on the 16³ grid."""
    torch.manual_seed(seed)
    model = model_from_spec(spec)
    for m in model.modules():
        if isinstance(m, FiLMNorm):
            torch.nn.init.normal_(m.film.weight, std=0.3)
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model_config": spec, "model": model.state_dict(),
                           "config": config or {}, "grid": 16})
    return path


def lenas_genotype(folder: Path, seed: int = 0) -> Path:
    space = get_space("lenas")
    folder.mkdir(parents=True, exist_ok=True)
    save_genotype(folder / "genotype.yaml", space.sample(np.random.RandomState(seed), macro=space.small_macro()))
    return folder / "genotype.yaml"


def onnx_output(file: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime  # optional: only the tests marked needs_onnx call this

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@needs_onnx
@pytest.mark.parametrize("name", list_models())
def test_reference_model_exports_to_onnx_at_two_sizes(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **small_kwargs(name)).eval()
    check = export_model(model, tmp_path / "model.onnx", TWO_SIZES, 16)
    assert set(check["max_abs_diff"]) == {"16x16x16", "32x32x32"}
    assert max(check["max_abs_diff"].values()) <= TWO_SIZES.tolerance
    x = torch.randn(1, 10, 32, 16, 24)  # and a size it was not checked at, not a cube
    with torch.no_grad():
        np.testing.assert_allclose(onnx_output(tmp_path / "model.onnx", x), model(x).numpy(), atol=1e-4)


@needs_onnx
def test_lenas_genotype_run_exports_with_model_yaml(tmp_path, capsys):
    spec = model_spec(ModelConfig(genotype=str(lenas_genotype(tmp_path / "g"))))
    ckpt = write_checkpoint(tmp_path / "best.pt", spec)
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "out"), "check_grid=32"]) == 0
    info = load_yaml(tmp_path / "out" / "model.yaml")
    assert info["kind"] == "model" and info["file"] == "model.onnx" and info["opset"] == 17
    assert info["input"]["channels"] == list(CHANNELS) and info["input"]["shape"] == [1, 10, "D", "H", "W"]
    assert "70" in info["output"]["scaling"]
    assert info["grids"]["example"] == 16 and info["grids"]["multiple"] == 4 and info["grids"]["minimum"] == 8
    assert set(info["check"]["max_abs_diff"]) == {"16x16x16", "32x32x32"}
    assert (tmp_path / "out" / "config.yaml").exists()
    model = model_from_spec(spec)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    x = torch.randn(1, 10, 24, 24, 24)
    with torch.no_grad():
        np.testing.assert_allclose(onnx_output(tmp_path / "out" / "model.onnx", x), model.eval()(x).numpy(),
                                   atol=1e-4)


@needs_onnx
def test_ensemble_exports_as_one_graph(tmp_path):
    names = ["a", "b"]
    for i, n in enumerate(names):
        genotype = lenas_genotype(tmp_path / "members" / n, seed=i)
        write_checkpoint(tmp_path / "members" / n / "best.pt", model_spec(ModelConfig(genotype=str(genotype))), i)
    save_ensemble(tmp_path / "ensemble.yaml", names, [0.25, 0.75], selection="greedy", combination="weighted",
                  tta=True)
    info = run(TWO_SIZES, Inputs(tmp_path / "ensemble.yaml"), tmp_path / "out")
    assert info["kind"] == "ensemble" and info["ensemble"] == {"members": names, "weights": [0.25, 0.75], "tta": True}
    assert max(info["check"]["max_abs_diff"].values()) <= 1e-4
    assert load_yaml(tmp_path / "out" / "model.yaml") == info


@needs_onnx
def test_cascade_stage_exports_the_stage_network(tmp_path):
    spec = model_spec(ModelConfig(name="unet3d", kwargs=small_kwargs("unet3d")), refiner=True)
    ckpt = write_checkpoint(tmp_path / "best.pt", spec, config={"cascade": {"coarse": "runs/coarse", "patch": 16}})
    info = run(Config(check_grid=32), Inputs(ckpt), tmp_path / "out")
    assert info["kind"] == "cascade stage" and info["cascade"]["coarse"] == "runs/coarse"
    assert info["input"]["channels"] == [*CHANNELS, COARSE_CHANNEL] and info["grids"]["example"] == 16
    assert "not in the graph" in info["cascade"]["note"]


def test_pt2_with_dynamic_sizes(tmp_path):
    torch.manual_seed(0)
    model = create_model("unet3d", **small_kwargs("unet3d")).eval()
    check = export_model(model, tmp_path / "model.pt2", Config(format="pt2", grid=16, check_grid=32), 16)
    assert max(check["max_abs_diff"].values()) <= 1e-5 and check["multiple"] == 4
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    x = torch.randn(1, 10, 16, 32, 24)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x))


def load_network(checkpoint: Path) -> torch.nn.Module:
    model = model_from_spec(torch.load(checkpoint, weights_only=True)["model_config"])
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    return model.eval()


SETTINGS = ([0.1, 0.05], [0.9, 0.4])  # two preference settings (oar, hi)


@needs_onnx
def test_a_conditioned_model_exports_with_its_preferences_as_a_second_input(tmp_path, capsys):
    spec = model_spec(ModelConfig(name="unet3d", kwargs=small_kwargs("unet3d"), conditioning="film"))
    ckpt = write_checkpoint(tmp_path / "best.pt", spec)
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "out"), "check_grid=32"]) == 0
    assert "(model, conditioned on oar, hi; checked against torch at 16x16x16, 32x32x32" in capsys.readouterr().out
    info = load_yaml(tmp_path / "out" / "model.yaml")
    prefs = info["preferences"]
    assert {k: prefs[k] for k in ("name", "shape", "dtype", "order", "ranges")} == {
        "name": "preferences", "shape": [1, 2], "dtype": "float32", "order": ["oar", "hi"],
        "ranges": {"oar": [0.0, 1.0], "hi": [0.0, 1.0]}}
    assert set(prefs["meaning"]) == {"oar", "hi"} and info["input"]["channels"] == list(CHANNELS)
    import onnxruntime  # optional: needs_onnx

    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input", "preferences"]
    model = load_network(ckpt)
    x = torch.randn(1, 10, 24, 24, 24)  # a size it was not checked at
    doses = []
    for values in SETTINGS:
        p = torch.tensor([values])
        got = session.run(None, {"input": x.numpy(), "preferences": p.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x, p).numpy(), atol=1e-4)
        doses.append(got)
    assert np.abs(doses[0] - doses[1]).max() > 1e-2  # the graph follows the preferences, not one setting


def test_a_conditioned_ensemble_exports_to_pt2_with_its_preferences(tmp_path):
    names = ["a", "b"]
    for i, n in enumerate(names):
        genotype = lenas_genotype(tmp_path / "members" / n, seed=i)
        write_checkpoint(tmp_path / "members" / n / "best.pt",
                         model_spec(ModelConfig(genotype=str(genotype), conditioning="film")), i)
    save_ensemble(tmp_path / "ensemble.yaml", names, [0.25, 0.75], selection="greedy", combination="weighted",
                  tta=True)
    info = run(Config(format="pt2", grid=16, check_grid=32), Inputs(tmp_path / "ensemble.yaml"), tmp_path / "out")
    assert info["kind"] == "ensemble" and info["preferences"]["order"] == ["oar", "hi"]
    assert max(info["check"]["max_abs_diff"].values()) <= 1e-4
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    members = [load_network(tmp_path / "members" / n / "best.pt") for n in names]
    x = torch.randn(1, 10, 16, 32, 24)
    doses = []
    for values in SETTINGS:
        p = torch.tensor([values])
        with torch.no_grad():  # the weighted mean of the members' clamped, flip-averaged doses
            expected = sum(w * flip_tta(lambda v, m=m: m(v, p).clamp_min(0), x) for w, m in zip((0.25, 0.75), members))
            got = program(x, p)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        doses.append(got)
    assert (doses[0] - doses[1]).abs().max() > 1e-3


def test_dynamic_sizes_must_be_multiples_of_the_depth(tmp_path):
    model = create_model("unet3d", **small_kwargs("unet3d"))
    with pytest.raises(ConfigError, match="multiple of 4"):
        export_model(model, tmp_path / "model.pt2", Config(format="pt2", grid=18), 18)
    assert not (tmp_path / "model.pt2").exists()


def test_a_non_model_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a model\n")
    assert main(["export", "--model", str(bad), "--out", str(tmp_path / "out"), "--format", "pt2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nasdose export: error: ") and str(bad) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_onnx_without_its_packages_says_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(NasDoseError, match=r"nasdose\[export\]"):
        export_model(create_model("unet3d", **small_kwargs("unet3d")), tmp_path / "model.onnx", Config(), 16)
