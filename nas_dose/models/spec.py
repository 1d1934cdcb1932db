"""A model named on the command line by a short spec (a distillation's student), as a ModelConfig
that `factory.build_model` builds.

SPEC forms (`nasdose distill --student SPEC`):

  NAME[:KEY=VALUE[:KEY=VALUE...]]   a registered model and its keyword arguments; a value with
                                    commas is a list, values are read as YAML scalars:
                                    unet3d:widths=8,16,32    unet3d:widths=8,16,32:norm=batch
  FILE.yaml                         a YAML file with a `model` section as in a training config
                                    (model: {name: unet3d, kwargs: {widths: [8, 16, 32]}}),
                                    or a genotype file (space, version, choices, macro)
  GENOTYPE.yaml:width=F             a genotype with the stem and widths of its macro scaled by F
                                    (each rounded, at least 1): a slimmer copy of a searched net
  search:max_flops=3e9[:...]        the most accurate genotype a cost-aware search finds within
                                    the limits (max_params, max_flops, max_latency_ms; optional
                                    strategy=NAME, budget=N): parsed here (`search_request`), run
                                    by `nasdose distill`, which then trains the chosen genotype

A genotype student is written into the run folder (student_genotype.yaml), so the run holds
exactly what it trained and its checkpoints rebuild without the original file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nas_dose.search_spaces import Genotype, get_space, load_genotype, save_genotype

from ..config import ConfigError, from_dict
from ..errors import NasDoseError
from ..io import load_yaml
from .factory import ModelConfig, build_model

GENOTYPE_FILE = "student_genotype.yaml"
_YAML_SUFFIXES = (".yaml", ".yml")


def _value(text: str) -> Any:
    """A spec value: YAML scalar, or a comma-separated list of them."""
    try:
        if "," in text:
            return [yaml.safe_load(v) for v in text.split(",")]
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise NasDoseError(f"value {text!r} cannot be read") from None


def _split(spec: str) -> tuple[str, dict[str, Any]]:
    """`head:k=v:k=v` -> (head, {k: v}); a head may hold ':' itself (package.module:attr)."""
    head, options = [], {}
    for part in spec.split(":"):
        if "=" in part:
            key, _, raw = part.partition("=")
            if not key or key in options:
                raise NasDoseError(f"option {part!r} has an empty or repeated key")
            options[key] = _value(raw)
        elif options:
            raise NasDoseError(f"{part!r} follows the options (write NAME:key=value:...)")
        else:
            head.append(part)
    return ":".join(head), options


def scale_genotype(g: Genotype, factor: float) -> Genotype:
    """`g` with its macro's stem and widths multiplied by `factor` (rounded, at least 1)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise NasDoseError(f"width must be a positive number, got {factor!r}")
    macro = dict(g.macro)
    macro["stem"] = max(1, round(macro["stem"] * factor))
    macro["widths"] = [max(1, round(w * factor)) for w in macro["widths"]]
    return get_space(g.space).genotype(g.choices, macro)


def _from_yaml(path: Path, options: dict[str, Any]) -> ModelConfig | Genotype:
    data = load_yaml(path)
    if isinstance(data, dict) and "model" in data:
        if options:
            raise NasDoseError(f"options {sorted(options)} apply to a genotype file, not to a model section")
        if not isinstance(data["model"], dict):
            raise NasDoseError(f"{path}: 'model' must be a mapping")
        try:
            model = from_dict(ModelConfig, data["model"])
        except ConfigError as e:
            raise NasDoseError(f"{path}: {e}") from None
        return model if model.genotype is None else load_genotype(model.genotype)
    unknown = sorted(set(options) - {"width"})
    if unknown:
        raise NasDoseError(f"unknown option '{unknown[0]}' for a genotype (known: width)")
    g = load_genotype(path)
    return scale_genotype(g, options["width"]) if "width" in options else g


@dataclass(frozen=True)
class StudentSearch:
    """A `search:` SPEC: the limits the student must keep (`max_params`, `max_flops`, `max_latency_ms`,
    in the order given) and, where given, the strategy and its budget."""

    limits: dict[str, float]
    strategy: str | None = None
    budget: int | None = None


SEARCH = "search"
LIMITS = ("max_params", "max_flops", "max_latency_ms")


def search_request(spec: str) -> StudentSearch | None:
    """The request of a `search:KEY=VALUE...` SPEC; None for any other SPEC."""
    try:
        head, options = _split(spec)
        if head != SEARCH:
            return None
        strategy, budget = options.pop("strategy", None), options.pop("budget", None)
        unknown = sorted(set(options) - set(LIMITS))
        if unknown:
            raise NasDoseError(f"unknown option '{unknown[0]}' for a search (known: {', '.join(LIMITS)}, "
                               "strategy, budget)")
        limits = {key: _number(key, value) for key, value in options.items()}
        if not limits:
            raise NasDoseError(f"a search student needs a limit ({', '.join(LIMITS)})")
        if strategy is not None and not isinstance(strategy, str):
            raise NasDoseError(f"strategy must be a name, got {strategy!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise NasDoseError(f"budget must be a whole number of at least 1, got {budget!r}")
    except NasDoseError as e:
        raise NasDoseError(f"--student {spec!r}: {e}") from None
    return StudentSearch(limits, strategy, budget)


def _number(key: str, value: Any) -> float:
    """A positive limit; YAML reads 3e9 as text, so numbers are taken from text too."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise NasDoseError(f"{key} must be a positive number, got {value!r}")
    return number


def resolve_student(spec: str, out: Path) -> ModelConfig:
    """The ModelConfig of a student SPEC (see the module docstring); a genotype student is saved
    as `out`/student_genotype.yaml and referenced from there. The network is built once to check
    it, so a bad argument fails here, naming the spec."""
    try:
        head, options = _split(spec)
        if head.endswith(_YAML_SUFFIXES):
            model = _from_yaml(Path(head), options)
        elif not head:
            raise NasDoseError("no model name")
        elif head == SEARCH:
            raise NasDoseError("a student sized by a search is found by `nasdose distill`, not a model")
        else:
            model = ModelConfig(name=head, kwargs=options)
        if isinstance(model, Genotype):
            out.mkdir(parents=True, exist_ok=True)
            save_genotype(out / GENOTYPE_FILE, model)
            model = ModelConfig(name=model.space, genotype=str(out / GENOTYPE_FILE))
        build_model(model)
    except NasDoseError as e:
        raise NasDoseError(f"--student {spec!r}: {e}") from None
    return model
