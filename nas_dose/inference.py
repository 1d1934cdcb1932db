"""Inference: what a trained model, an ensemble (ensemble.yaml) or a cascade predicts for a data
set's patients, with flip test-time augmentation; the one loader of every kind of predictor."""
from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial, reduce
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from nas_dose.search_spaces import load_genotype

from .cascade.patches import CascadeConfig
from .cascade.windows import predict_source, source_grids
from .config import from_dict
from .data.dataset import PlanItem, build_input, measured_items, plan_reference
from .data.patient import DOSE_SCALE_GY, Patient
from .data.preferences import MEASURED, check
from .data.store import DataFile, open_data
from .data.tta import flip_tta
from .errors import input_error
from .io import load_checkpoint, load_yaml, save_yaml
from .models.conditioning import Conditioned, Preset
from .models.factory import check_trained_on, load_model, spec_genotype, spec_inputs
from .models.refiner import Refiner
from .runtime import Runtime
from .scores import Scores, score_on_source, score_patients


class Predictor(Protocol):
    """Input batch (N, IN_CHANNELS, D, H, W) on the runtime's device -> dose / 70 (N, 1, D, H, W).

    A model in eval mode is one; an ensemble is any callable that averages its members.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def predict_patients(predictor: Predictor, data: DataFile, ids: list[str], runtime: Runtime,
                     tta: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(id, dose in Gy on the data set's grid) per patient: non-negative, zero outside the mask."""
    for pid in ids:
        yield pid, predict_patient(predictor, data.read(pid), runtime, tta)


def predict_patient(predictor: Predictor, patient: Patient, runtime: Runtime, tta: bool = False) -> np.ndarray:
    """The dose (Gy) of one patient on its own grid: non-negative, zero outside its mask."""
    x = runtime.to_device(torch.from_numpy(build_input(patient))[None])
    with torch.inference_mode(), runtime.autocast():
        y = flip_tta(predictor, x) if tta else predictor(x)
    dose = y.float()[0, 0].cpu().numpy() * DOSE_SCALE_GY
    return np.where(patient.possible_dose_mask, np.maximum(dose, 0), 0).astype(np.float32)


@dataclass
class Cascade:
    """A coarse predictor and the refiner that takes its dose to the source grid."""

    coarse: Predictor
    refiner: torch.nn.Module
    config: CascadeConfig

    def predict(self, data: DataFile, ids: list[str], runtime: Runtime,
                tta: bool = False) -> Iterator[tuple[str, np.ndarray]]:
        """(id, source-grid dose in Gy) per patient; `tta` averages the flips of both stages."""
        factor = source_grids(data, ids)
        for pid, coarse in predict_patients(self.coarse, data, ids, runtime, tta):
            yield pid, predict_source(self.refiner, data.read_source(pid), coarse, factor, self.config,
                                      runtime.device, tta)


@dataclass
class AtMeasured:
    """A conditioned model (or ensemble, on the runtime's device) asked, patient by patient, for
    the preferences measured on the patient's own dose (`measured_items`)."""

    model: nn.Module

    def predict(self, data: DataFile, ids: list[str], runtime: Runtime,
                tta: bool = False) -> Iterator[tuple[str, np.ndarray]]:
        """(id, dose in Gy on the data set's grid) per patient; a patient whose preferences cannot
        be measured is refused before any is predicted."""
        return predict_plans(self.model, data, measured_items(data, ids), runtime, tta)


FORMAT = "nasdose-ensemble"


VERSION = 1


class Ensemble(nn.Module):
    """The weighted sum of the members' outputs (dose / 70), usable wherever one model is.

    Each member's output is clamped at zero before weighting, as `predict` clamps a single
    model's, so the ensemble's prediction is exactly the weighted mean of its members' own
    predictions; with `tta` each member is averaged over predict's flips first. An ensemble of
    conditioned members is conditioned: `forward(x, preferences)` asks every member for them.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], tta: bool = False,
                 names: Sequence[str] | None = None) -> None:
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ValueError(f"{len(members)} members for {len(weights)} weights")
        self.members = nn.ModuleList(members)
        self.weights = [float(w) for w in weights]
        self.tta = tta
        self.names = list(names) if names is not None else [f"member{i}" for i in range(len(members))]

    def combine(self, x: torch.Tensor, preferences: torch.Tensor | None = None) -> torch.Tensor:
        asked = () if preferences is None else (preferences,)
        weighted = (member(x, *asked).float().clamp_min(0) * w for w, member in zip(self.weights, self.members))
        return reduce(operator.add, weighted)

    def forward(self, x: torch.Tensor, preferences: torch.Tensor | None = None) -> torch.Tensor:
        return flip_tta(partial(self.combine, preferences=preferences), x) if self.tta else self.combine(x, preferences)


def save_ensemble(path: Path, names: Sequence[str], weights: Sequence[float], *, selection: str,
                  combination: str, tta: bool) -> None:
    """ensemble.yaml, member files relative to it, so the folder can be moved whole."""
    save_yaml(path, {
        "format": FORMAT, "version": VERSION, "selection": selection,
        "combination": combination, "tta": tta,
        "members": [{"name": n, "genotype": f"members/{n}/genotype.yaml", "checkpoint": f"members/{n}/best.pt",
                     "weight": float(w)} for n, w in zip(names, weights)]})


def load_ensemble(path: str | Path, grid: int | None = None, extra: Sequence[str] | None = None) -> Ensemble:
    """The ensemble an ensemble.yaml describes, on the CPU in eval mode.

    Weights must be non-negative; they are normalized to sum to 1. Each checkpoint must hold
    the network of the genotype file listed beside it (trained on `grid`³ volumes with the
    `extra` input channels, if given).
    """
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise input_error(path, f"not a nasdose ensemble file (format is not '{FORMAT}')")
    if data.get("version") != VERSION:
        raise input_error(path, f"ensemble version {data.get('version')!r} is not supported (expected {VERSION})")
    raw = data.get("members")
    if not isinstance(raw, list) or not raw:
        raise input_error(path, "'members' must be a non-empty list")
    if not isinstance(data.get("tta", False), bool):
        raise input_error(path, "'tta' must be true or false")
    models: list[nn.Module] = []
    weights: list[float] = []
    names: list[str] = []
    for i, m in enumerate(raw):
        if (not isinstance(m, dict)
                or not all(isinstance(m.get(k), str) for k in ("name", "genotype", "checkpoint"))
                or isinstance(m.get("weight"), bool) or not isinstance(m.get("weight"), (int, float))
                or not m["weight"] >= 0):
            raise input_error(path, f"member {i}: needs name, genotype, checkpoint (strings) and a weight >= 0")
        model, meta = load_model(path.parent / m["checkpoint"])
        check_trained_on(path.parent / m["checkpoint"], meta, grid, extra)
        genotype = load_genotype(path.parent / m["genotype"])
        if meta["model_config"].get("genotype") != spec_genotype(genotype, bool(meta["model_config"].get("refiner"))):
            raise input_error(path, f"member {m['name']}: {m['checkpoint']} does not hold the network "
                                    f"of {m['genotype']}")
        if models and conditioned_on(model) != conditioned_on(models[0]):
            mine, first = (", ".join(conditioned_on(x)) or "none" for x in (model, models[0]))
            raise input_error(path, f"member {m['name']}: conditioned on preferences ({mine}) unlike member "
                                    f"{names[0]} ({first})")
        models.append(model)
        weights.append(float(m["weight"]))
        names.append(m["name"])
    total = sum(weights)
    if not total > 0:
        raise input_error(path, "the member weights sum to zero")
    return Ensemble(models, [w / total for w in weights], bool(data.get("tta", False)), names).eval()


def load_model_or_ensemble(path: str | Path, grid: int | None = None,
                           extra: Sequence[str] | None = None) -> nn.Module:
    """A single trained model (run folder or checkpoint) or an ensemble (its .yaml file), on
    the CPU in eval mode: what `nasdose predict --model` accepts. With `grid` (`extra`), every
    network must have been trained on that grid (and take those extra input channels)."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        return load_ensemble(path, grid, extra)
    model, meta = load_model(path)
    check_trained_on(path, meta, grid, extra)
    return model


def conditioned_on(model: nn.Module) -> tuple[str, ...]:
    """The preferences a model (an ensemble: its members, which agree) is conditioned on, in its
    order (none for a plain model)."""
    if isinstance(model, Ensemble):
        return conditioned_on(model.members[0])
    return model.names if isinstance(model, Conditioned) else ()


def with_preferences(path: Path, model: nn.Module,
                     values: Mapping[str, float] | Literal["measured"] | None) -> nn.Module:
    """The model as a one-input predictor: a conditioned one asked for `values` (which it needs),
    a plain one as it is (which takes none); at `MEASURED` the conditioned model itself, checked."""
    names = conditioned_on(model)
    if values is None and names:
        raise input_error(path, f"is conditioned on preferences: give them (e.g. --preference "
                                f"{','.join(f'{n}=0.5' for n in names)})")
    if values is None:
        return model
    if not names:
        raise input_error(path, "is not conditioned on preferences (trained without model.conditioning): drop them")
    return model if isinstance(values, str) else Preset(model, check(values, names).tolist())


def load_predictor(path: Path, runtime: Runtime, grid: int | None = None,
                   preferences: Mapping[str, float] | None = None,
                   extra: Sequence[str] | None = None) -> Predictor | Cascade:
    """A run folder, a checkpoint or an ensemble's .yaml, on the runtime's device, in eval mode;
    with `grid` (`extra`), refused unless trained on that grid (with those extra input channels).
    A cascade's full-resolution run comes with its coarse stage (the run's `cascade.coarse`). A
    conditioned model is asked for `preferences`."""
    model = with_preferences(Path(path), load_model_or_ensemble(path, grid, extra), preferences)
    return as_predictor(Path(path), model, runtime, grid)


def load_at_measured(path: Path, runtime: Runtime, grid: int | None = None,
                     extra: Sequence[str] | None = None) -> AtMeasured:
    """What `load_predictor` loads, for a conditioned model (never a cascade's stage), asked for
    each patient's own measured preferences; a plain model is refused."""
    model = with_preferences(Path(path), load_model_or_ensemble(path, grid, extra), MEASURED)
    return AtMeasured(runtime.prepare(model).eval())


def as_predictor(path: Path, model: nn.Module, runtime: Runtime, grid: int | None = None) -> Predictor | Cascade:
    """The model loaded from `path` ready to predict: prepared on the runtime, and for a cascade's
    full-resolution stage with its coarse stage loaded beside it."""
    networks = list(model.members) if isinstance(model, Ensemble) else [model]
    refiners = sum(isinstance(m, Refiner) for m in networks)
    if not refiners:
        return runtime.prepare(model).eval()
    if refiners < len(networks):
        raise input_error(path, "mixes full-resolution stages of a cascade with whole-volume networks")
    cfg = cascade_config(Path(path))
    if cfg.coarse is None or Path(cfg.coarse).resolve() == Path(path).resolve():
        raise input_error(path, "a refiner whose config names no coarse stage (cascade.coarse)")
    coarse = load_predictor(Path(cfg.coarse), runtime, grid)
    if isinstance(coarse, Cascade):
        raise input_error(path, f"its coarse stage {cfg.coarse} is itself a cascade")
    return Cascade(coarse, runtime.prepare(model).eval(), cfg)


def _first_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint of the model at `path` (a run, a checkpoint, an ensemble .yaml: its first
    member's), its tensors mapped, not read: callers want its records, and the weights are read
    once, where the model is loaded."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        path = path.parent / load_yaml(path)["members"][0]["checkpoint"]
    return load_checkpoint(path / "best.pt" if path.is_dir() else path, mmap=True)


def trained_grid(path: Path) -> int | None:
    """The grid the model at `path` (a run, a checkpoint, an ensemble .yaml) was trained on: its
    input grid, a cascade's coarse stage's (None for checkpoints older than the record)."""
    grid = _first_checkpoint(path).get("grid")
    return None if grid is None else int(grid)


def trained_inputs(path: Path) -> tuple[str, ...]:
    """The extra input channels the model at `path` takes (`spec_inputs`)."""
    return spec_inputs(_first_checkpoint(path)["model_config"])


def open_for(data: Path, model: Path) -> DataFile:
    """The data set, open, giving only the extra input channels the model at `model` takes (one
    trained with `train.data.hide` takes fewer than its data set has). A model that takes one
    the data set lacks is refused where it is loaded (`check_trained_on`)."""
    d = open_data(data)
    takes = trained_inputs(model)
    return d.only_extra(takes) if set(takes) <= set(d.extra_channels) else d


def cascade_config(path: Path) -> CascadeConfig:
    """The `cascade` section a refiner was trained with; for an ensemble of refiners the one its
    members share (the same coarse stage and windows)."""
    ensemble = path.suffix in (".yaml", ".yml")
    files = [path.parent / m["checkpoint"] for m in load_yaml(path)["members"]] if ensemble else [path]
    configs = [from_dict(CascadeConfig, _first_checkpoint(f)["config"].get("cascade")) for f in files]
    if any((c.coarse, c.patch, c.overlap) != (configs[0].coarse, configs[0].patch, configs[0].overlap)
           for c in configs):
        raise input_error(path, "its members refine different coarse stages or use different windows")
    return configs[0]


def predictions(predictor: Predictor | Cascade | AtMeasured, data: DataFile, ids: list[str], runtime: Runtime,
                tta: bool = False) -> tuple[int, Iterator[tuple[str, np.ndarray]]]:
    """The grid a predictor's doses are on (a cascade's: the source grid), and (id, dose in Gy)
    per patient: non-negative, zero outside the mask."""
    if isinstance(predictor, Cascade):
        return data.grid * source_grids(data, ids), predictor.predict(data, ids, runtime, tta)
    if isinstance(predictor, AtMeasured):
        return data.grid, predictor.predict(data, ids, runtime, tta)
    return data.grid, predict_patients(predictor, data, ids, runtime, tta)


def official_scores(predictor: Predictor | Cascade | AtMeasured, data: DataFile, ids: list[str], runtime: Runtime,
                    tta: bool = False) -> Scores:
    """The OpenKBP scores of a model's or a cascade's doses (a conditioned model's at each patient's
    own measured preferences: `AtMeasured`), on the source grid."""
    _, doses = predictions(predictor, data, ids, runtime, tta)
    return score_on_source(data, doses)


def predict_plans(model: nn.Module, data: DataFile, items: Sequence[PlanItem], runtime: Runtime,
                  tta: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(item key, dose in Gy on the data set's grid) of a conditioned model (or ensemble, on the
    runtime's device) asked for each item's preferences: the doses to score against its plans."""
    for item in items:
        asked = Preset(model, item.values.tolist()).to(runtime.device)
        yield item.key, predict_patient(asked, data.read(item.pid), runtime, tta)


def score_plans(data: DataFile, items: Sequence[PlanItem], doses: Iterator[tuple[str, np.ndarray]]) -> Scores:
    """The OpenKBP scores of doses predicted for plan items (`predict_plans`) against each item's
    plan, on the data set's grid: one scored "patient" per plan, named by its key."""
    by_key = {item.key: item for item in items}
    return score_patients((plan_reference(data, by_key[key]), dose) for key, dose in doses)
