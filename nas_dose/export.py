"""Export a trained model, an ensemble or a cascade's stage as one graph (ONNX or torch.export),
checked against torch, so that it runs without nasdose (onnxruntime, TensorRT, libtorch).

  nasdose export --model MODEL --out DIR [--format onnx|pt2] [key=value ...]

MODEL is a training run folder (its best.pt), a checkpoint or an ensemble .yaml (the weighted
ensemble, with its flip TTA when it has one, becomes one graph). A cascade's full-resolution stage
(a refiner, or an ensemble of them) is exported as the stage network alone: its input has one
channel more, the coarse stage's dose / 70 Gy upsampled to the source grid; the coarse stage is
exported separately (its own `nasdose export`) and the window-by-window inference of `nasdose
predict` is not in the graph (run the stage on windows of `cascade.patch` voxels, or whole).

DIR receives model.onnx (or model.pt2), config.yaml and model.yaml, which describes the input
(its channels in order, their scaling), the output (dose / 70 Gy), the sizes the graph accepts
and the largest difference between the exported graph and torch on random inputs.

A model conditioned on planning preferences (or an ensemble of such members) becomes a graph of
two inputs: `input` as above and `preferences`, shape (1, P), float32, the values in their own
units in the order model.yaml's `preferences` lists them with their ranges (the graph scales them
by the ranges stored in the checkpoint; it does not check that a value is in its range). The graph
is checked against torch at random preferences in their ranges, one setting per size.

With `dynamic: true` (the default) the spatial axes are free, but a U-Net halves the volume
depth times: each spatial size must be a multiple of 2^depth (model.yaml's `multiple`; the
graph does not pad) and at least twice that. The graph is checked at `grid` and at
`check_grid` (default: one multiple less, or more). With `dynamic: false` it takes `grid`³ only.
The batch is 1. Trailing key=value pairs set the config: format, dynamic, opset, grid,
check_grid, tolerance.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from nas_dose.search_spaces import CellUNet

from .config import ConfigError, at_least, save_config
from .data.dataset import CHANNELS, CT_HU_RANGE, CT_SCALE
from .data.patient import DOSE_SCALE_GY, PRESCRIPTION_GY, TARGETS
from .data.preferences import PREFERENCES as PREFERENCE_TABLE
from .errors import NasDoseError, input_error
from .inference import Ensemble, cascade_config, load_model_or_ensemble, trained_grid, trained_inputs
from .io import atomic_path, output_folder, refuse_existing, save_yaml
from .models.conditioning import Conditioned
from .models.refiner import Refiner
from .models.unet3d import UNet
from .progress import say

Format = Literal["onnx", "pt2"]
COARSE_CHANNEL = "coarse_dose"
INPUT, OUTPUT = "input", "dose"
PREFERENCES = "preferences"  # a conditioned model's second input


@dataclass
class Config:
    """`grid`: the example input's size (None: the grid the model was trained on; a cascade
    stage's: its training patch); `check_grid`: the second size checked with dynamic axes (None:
    one multiple of 2^depth less than `grid`, or more when that is too small); `tolerance`: the
    largest difference from torch allowed, in dose / 70 Gy units."""

    format: Format = "onnx"
    dynamic: bool = True
    opset: int = 17
    grid: int | None = None
    check_grid: int | None = None
    tolerance: float = 1e-4

    def validate(self) -> None:
        at_least("opset", self.opset, 9)
        for key in ("grid", "check_grid"):
            if getattr(self, key) is not None:
                at_least(key, getattr(self, key), 1)
        if not self.tolerance > 0:
            raise ConfigError(f"config key 'tolerance': must be positive, got {self.tolerance}")


@dataclass(frozen=True)
class Inputs:
    model: Path  # a training run folder (its best.pt), a checkpoint or an ensemble .yaml


def size_multiple(model: nn.Module) -> int:
    """What every spatial size must be a multiple of: each U-Net level halves the volume (the
    reference U-Nets pad to it in torch, but a traced graph keeps the example's padding)."""
    factors = [m.factor for m in model.modules() if isinstance(m, UNet)]
    factors += [2 ** m.depth for m in model.modules() if isinstance(m, CellUNet)]
    return math.lcm(1, *factors)


def is_stage(model: nn.Module) -> bool:
    """Whether the model is a cascade's full-resolution stage (one refiner or an ensemble of them)."""
    networks = list(model.members) if isinstance(model, Ensemble) else [model]
    return all(isinstance(m, Refiner) for m in networks)


def conditioning(model: nn.Module) -> Conditioned | None:
    """The conditioned network whose preferences the graph takes (an ensemble's first member's:
    its members agree), None for a plain model."""
    return next((m for m in model.modules() if isinstance(m, Conditioned)), None)


def example_inputs(model: nn.Module, size: int, generator: torch.Generator | None = None,
                   extra: Sequence[str] = ()) -> tuple[torch.Tensor, ...]:
    """The graph's inputs at `size`³ (with the `extra` input channels): zeros without `generator`,
    else random (the patient input standard normal, each preference uniform in its range)."""
    shape = (1, len(channel_names(model, extra)), size, size, size)
    x = torch.randn(*shape, generator=generator) if generator is not None else torch.zeros(shape)
    cond = conditioning(model)
    if cond is None:
        return (x,)
    if generator is None:
        return x, cond.low[None].clone()
    return x, cond.low[None] + cond.span[None] * torch.rand(1, len(cond.names), generator=generator)


def channel_names(model: nn.Module, extra: Sequence[str] = ()) -> list[str]:
    """The graph's input channels: the standard ones, a data set's extra ones (a cascade stage's
    refiner has none) and a stage's coarse dose."""
    return [*CHANNELS, COARSE_CHANNEL] if is_stage(model) else [*CHANNELS, *extra]


def check_sizes(config: Config, grid: int, multiple: int) -> list[int]:
    """The sizes the export is checked at: `grid`, and with dynamic axes a second one; both
    multiples of `multiple` and at least twice it."""
    if not config.dynamic:
        return [grid]
    second = config.check_grid
    if second is None:
        second = grid - multiple if grid - multiple >= 2 * multiple else grid + multiple
    for key, size in (("grid", grid), ("check_grid", second)):
        if size % multiple or size < 2 * multiple:
            raise ConfigError(f"config key '{key}': {size} voxels; with dynamic axes each size must be a multiple "
                              f"of {multiple} (2^depth of the U-Net) and at least {2 * multiple}")
    return [grid, second] if second != grid else [grid]


def input_names(model: nn.Module) -> list[str]:
    """The graph's inputs in order: the patient input, and a conditioned model's preferences."""
    return [INPUT] if conditioning(model) is None else [INPUT, PREFERENCES]


def _write_onnx(model: nn.Module, examples: tuple[torch.Tensor, ...], config: Config, file: Path) -> None:
    """The TorchScript-based exporter: it needs no onnxscript, and a trace at a multiple of
    2^depth is valid at every such size (sizes are traced as shape ops)."""
    axes = {2: "D", 3: "H", 4: "W"} if config.dynamic else {}
    with warnings.catch_warnings():  # the exporter's deprecation and tracer warnings say nothing here
        warnings.simplefilter("ignore")
        torch.onnx.export(model, examples, str(file), dynamo=False, opset_version=config.opset,
                          input_names=input_names(model), output_names=[OUTPUT],
                          dynamic_axes={INPUT: axes, OUTPUT: axes} if axes else None)


def _write_pt2(model: nn.Module, examples: tuple[torch.Tensor, ...], config: Config, multiple: int,
               file: Path) -> None:
    """torch.export with each spatial size a multiple of `multiple` (so the padding branches of
    the U-Nets are decided for every size), at least twice it; the preferences' shape is fixed."""
    shapes = None
    if config.dynamic:
        dims = [torch.export.Dim(axis, min=2) for axis in "DHW"]
        spatial = {i + 2: multiple * d if multiple > 1 else d for i, d in enumerate(dims)}
        shapes = (spatial, *(None,) * (len(examples) - 1))
    buffer = io.BytesIO()  # torch.export names no file but a .pt2: saved whole, then written aside
    torch.export.save(torch.export.export(model, examples, dynamic_shapes=shapes), buffer)
    file.write_bytes(buffer.getvalue())


def _runner(file: Path, fmt: Format, names: list[str]) -> tuple[Callable[..., np.ndarray], str]:
    """The exported graph as a function of its numpy inputs (in `names` order), and the runtime
    that runs it."""
    if fmt == "pt2":
        module = torch.export.load(io.BytesIO(file.read_bytes())).module()
        return lambda *xs: module(*map(torch.from_numpy, xs)).detach().numpy(), f"torch {torch.__version__}"
    import onnx  # optional (the `export` extra): only ONNX export needs them
    import onnxruntime

    onnx.checker.check_model(str(file))
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return lambda *xs: session.run(None, dict(zip(names, xs, strict=True)))[0], f"onnxruntime {onnxruntime.__version__}"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401  (optional: the `export` extra; checked before any work)
        import onnxruntime  # noqa: F401
    except ImportError:
        raise NasDoseError("ONNX export needs onnx and onnxruntime: pip install 'nasdose[export]' "
                           "(or format=pt2)") from None


def export_model(model: nn.Module, path: Path, config: Config, grid: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Write `model` (eval mode, CPU; taking the `extra` input channels) to `path` as
    `config.format` and check that the graph gives torch's output on random inputs (a conditioned
    model's: at random preferences) at each checked size; returns what was checked. `path`
    appears only once checked (written aside, renamed)."""
    if config.format == "onnx":
        _require_onnx()
    model = model.eval().cpu()
    multiple = size_multiple(model)
    sizes = check_sizes(config, grid, multiple)
    generator = torch.Generator().manual_seed(0)
    diffs: dict[str, float] = {}
    with atomic_path(path) as tmp, torch.no_grad():
        if config.format == "onnx":
            _write_onnx(model, example_inputs(model, grid, extra=extra), config, tmp)
        else:
            _write_pt2(model, example_inputs(model, grid, extra=extra), config, multiple, tmp)
        run_graph, runtime = _runner(tmp, config.format, input_names(model))
        for size in sizes:
            inputs = example_inputs(model, size, generator, extra)
            expected, got = model(*inputs).numpy(), run_graph(*(t.numpy() for t in inputs))
            if got.shape != expected.shape:
                raise NasDoseError(f"{path}: the exported graph's output is {got.shape} at {size}³, "
                                   f"torch's {expected.shape}")
            diffs[f"{size}x{size}x{size}"] = float(np.abs(got - expected).max())
        worst = max(diffs.values())
        if not worst <= config.tolerance:
            raise NasDoseError(f"{path}: the exported graph differs from torch by {worst:.3g} (tolerance "
                               f"{config.tolerance:g}; set tolerance=... to accept it)")
    return {"runtime": runtime, "tolerance": config.tolerance, "max_abs_diff": diffs, "multiple": multiple}


def _channel_scaling(names: list[str], extra: Sequence[str] = ()) -> dict[str, str]:
    """How each input channel is made from a patient (nas_dose.data.dataset.build_input)."""
    ptv = " / ".join(f"{PRESCRIPTION_GY[t] / DOSE_SCALE_GY:.1f}" for t in reversed(TARGETS))
    known = {"ct": f"clip(HU, {CT_HU_RANGE[0]:g}, {CT_HU_RANGE[1]:g}) / {CT_SCALE:g}, HU = stored CT - 1024",
             "ptv": f"{ptv} inside {' / '.join(reversed(TARGETS))} (the highest wins), 0 elsewhere",
             "possible_dose_mask": "1 where dose is possible, 0 elsewhere",
             COARSE_CHANNEL: f"the coarse stage's dose / {DOSE_SCALE_GY:g} Gy, upsampled to this grid",
             **dict.fromkeys(extra, "the data set's extra input volume of that name, as stored")}
    return {n: known.get(n, "1 inside the structure, 0 outside") for n in names}


def describe(model: nn.Module, source: Path, config: Config, grid: int, check: dict[str, Any],
             extra: Sequence[str] = ()) -> dict[str, Any]:
    """model.yaml: what a program needs to feed the graph and read its output."""
    names = channel_names(model, extra)
    multiple = check["multiple"]
    spatial: list[int | str] = ["D", "H", "W"] if config.dynamic else [grid] * 3
    info: dict[str, Any] = {
        "format": config.format, "file": f"model.{config.format}", "source": str(source),
        "kind": ("cascade stage" if is_stage(model) else "ensemble" if isinstance(model, Ensemble) else "model"),
        "input": {"name": INPUT, "shape": [1, len(names), *spatial], "dtype": "float32", "channels": names,
                  "scaling": _channel_scaling(names, extra),
                  "axes": "(batch, channel, D, H, W) with D, H, W = OpenKBP axes 0, 1, 2"},
        "output": {"name": OUTPUT, "shape": [1, 1, *spatial], "dtype": "float32",
                   "scaling": f"dose / {DOSE_SCALE_GY:g} Gy: multiply by {DOSE_SCALE_GY:g} for Gy; nasdose "
                              "predict then clamps at 0 and zeroes it outside possible_dose_mask"},
        "grids": {"example": grid, "dynamic": config.dynamic, "multiple": multiple, "minimum": 2 * multiple,
                  "accepts": (f"any D, H, W that are multiples of {multiple} and at least {2 * multiple} "
                              "(not checked by the graph)") if config.dynamic else f"{grid}^3 only"},
        "check": {k: v for k, v in check.items() if k != "multiple"},
    }
    if config.format == "onnx":
        info["opset"] = config.opset
    cond = conditioning(model)
    if cond is not None:
        info["preferences"] = {
            "name": PREFERENCES, "shape": [1, len(cond.names)], "dtype": "float32", "order": list(cond.names),
            "ranges": {n: [round(float(lo), 6), round(float(lo + span), 6)]  # float32 buffers
                       for n, lo, span in zip(cond.names, cond.low, cond.span)},
            "meaning": {n: PREFERENCE_TABLE[n][2] for n in cond.names if n in PREFERENCE_TABLE},
            "scaling": "each value in its own units, within its range (the graph scales it to [0, 1] by the range "
                       "and does not check it)"}
    if isinstance(model, Ensemble):
        info["ensemble"] = {"members": model.names, "weights": model.weights, "tta": model.tta}
    if is_stage(model):
        info["cascade"] = {
            "coarse": cascade_config(source).coarse,
            "note": "the full-resolution stage only: export the coarse stage separately, feed its dose "
                    f"(/ {DOSE_SCALE_GY:g} Gy, upsampled) as the last channel; nasdose predict's "
                    "window-by-window inference is not in the graph"}
    return info


def default_grid(model: nn.Module, path: Path) -> int:
    """The grid the model works on: a cascade stage's training patch, else its training grid."""
    grid = cascade_config(path).patch if is_stage(model) else trained_grid(path)
    if grid is None:
        raise input_error(path, "records no training grid (an old checkpoint): give grid=N")
    return grid


def run(config: Config, inputs: Inputs, out: Path, resume: bool = False, *, force: bool = False) -> dict[str, Any]:
    """Export into `out`; returns model.yaml's content. Nothing to resume: an export is made again
    whole; an earlier one in `out` is replaced only with `force`."""
    out = Path(out)
    with output_folder(out):
        refuse_existing([out / "model.yaml", out / f"model.{config.format}"], force)
        if config.format == "onnx":
            _require_onnx()
        model = load_model_or_ensemble(inputs.model)
        extra = trained_inputs(inputs.model)
        if any(isinstance(m, Refiner) for m in model.modules()) and not is_stage(model):
            raise input_error(inputs.model, "mixes full-resolution stages of a cascade with whole-volume networks")
        grid = config.grid if config.grid is not None else default_grid(model, inputs.model)
        save_config(out / "config.yaml", config)
        check = export_model(model, out / f"model.{config.format}", config, grid, extra)
        info = describe(model, inputs.model, config, grid, check, extra)
        save_yaml(out / "model.yaml", info)
    worst = max(check["max_abs_diff"].values())
    asked = f", conditioned on {', '.join(info['preferences']['order'])}" if "preferences" in info else ""
    say(f"exported {inputs.model} to {out / info['file']} ({info['kind']}{asked}; checked against torch at "
        f"{', '.join(check['max_abs_diff'])}: max difference {worst:.2g}), described in {out / 'model.yaml'}")
    return info
