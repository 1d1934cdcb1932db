"""Typed YAML configs: dataclasses validated on load, overridable with `key.sub=value`.

A config class is a plain dataclass whose fields have defaults. `load_config` merges, in order,
the defaults, a YAML file and command-line overrides, then checks every key and type so that a
typo fails at once with the key's dotted name instead of deep inside a run.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import NasDoseError, input_error
from .io import load_yaml, save_yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(NasDoseError):
    """A config key is unknown, missing or of the wrong type."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type `tp` and return it converted (int -> float, list -> tuple)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in get_args(tp):
            return "on" if value else "off"  # YAML 1.1 reads `off` (runtime.amp=off) as false
        if value in get_args(tp):
            return value
        raise ConfigError(f"config key '{key}': expected one of {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-3` (no dot) as text
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            args = get_args(tp)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(args) != len(value):
                    raise ConfigError(f"config key '{key}': expected {len(args)} items, got {len(value)}")
                return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            item = args[0] if args else Any
            items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            ktp, vtp = get_args(tp) or (Any, Any)
            return {_convert(k, ktp, key): _convert(v, vtp, f"{key}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"unsupported config type {tp!r} for '{key}'")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(fields)})")
    kwargs = {}
    for name, field in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing config key '{dotted}'")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def from_dict(cls: type[C], data: dict[str, Any] | None, prefix: str = "") -> C:
    """Build and validate a config dataclass from plain data (unknown keys are errors); `prefix`
    is where the data sits in a larger config, so that errors name the whole dotted key."""
    return _from_dict(cls, data or {}, prefix)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-safe data of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(dataclasses.asdict(config))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (['a', 'b'], value), the value parsed as YAML (`3`, `1e-3`, `[1,2]`)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` override set (nested mappings created)."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> C:
    """Defaults, then `base`, then the YAML file at `path`, then overrides; validated.

    Errors from the file name the file, so the user sees which config and which key is wrong;
    an error the overrides brought in is theirs (the file alone does not have it). `path` may
    name one of the configs shipped with nasdose (`search_evolution`: nas_dose/configs/*.yaml).
    """
    data: dict[str, Any] = dict(base or {})
    path = shipped_config(path) if path is not None else None
    if path is not None:
        loaded = load_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping")
        data = deep_merge(data, loaded)
    try:
        return from_dict(cls, apply_overrides(data, overrides or []))
    except ConfigError as e:
        if path is None or (overrides and _error_of(cls, data) != str(e)):
            raise
        raise ConfigError(f"{path}: {e}") from None


def _error_of(cls: type, data: dict[str, Any]) -> str | None:
    """The config error `data` alone raises, if any."""
    try:
        from_dict(cls, data)
    except ConfigError as e:
        return str(e)
    return None


SHIPPED = Path(__file__).resolve().parent / "configs"


def shipped_config(path: str | Path) -> Path:
    """`path` itself, or where it names a shipped config (a bare name, no such file here) that one."""
    path = Path(path)
    named = SHIPPED / f"{path.name}.yaml"
    return named if not path.exists() and path.suffix == "" and path.parent == Path(".") and named.exists() else path


def layered(cls: type[C], base: dict[str, Any], recipe: dict[str, Any], where: str) -> C:
    """A config from `base` with a recipe's mapping on top (a pipeline recipe's section `where`,
    named in errors)."""
    try:
        return from_dict(cls, deep_merge(base, recipe))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def save_config(path: str | Path, config: Any) -> None:
    """Write the resolved config next to a run's outputs, so the run can be repeated exactly."""
    save_yaml(path, to_dict(config))


__all__ = ["ConfigError", "from_dict", "to_dict", "load_config", "layered", "save_config", "apply_overrides",
           "parse_override", "add_config_arguments", "check_run_folder", "int_at_least"]


def check_run_folder(out: Path, cfg: Any, resume: bool, what: str, started: Path,
                     keys: tuple[str, ...],
                     recorded: Callable[[dict[str, Any]], dict[str, Any]] = lambda old: old) -> None:
    """A new run needs a folder without `out`/config.yaml and without `started` (its first
    output); a resumed run the same values of `keys` as its config.yaml. `what` names the run;
    `recorded` reads the config.yaml of an older release as this one would write it."""
    old_file = out / "config.yaml"
    if not resume:
        if old_file.exists() or started.exists():
            raise input_error(out, f"already holds {what}; use --resume to continue it, --force to replace it, "
                                  "or another --out")
        return
    if not old_file.exists():
        return
    old, new = recorded(to_dict(load_config(type(cfg), old_file))), to_dict(cfg)
    changed = [k for k in keys if old[k] != new[k]]
    if changed:
        raise input_error(old_file, f"the run was made with a different {', '.join(changed)}; resume with "
                                    "its config.yaml or choose another --out")


def at_least(key: str, value: float, low: float) -> None:
    """The one check most config fields need, with the one message for it."""
    if value < low:
        raise ConfigError(f"config key '{key}': must be at least {low}, got {value}")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type for integers >= `low` (a count, a grid size), with a readable error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse type for a positive finite number (a size in mm), with a readable error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """The config options every configurable command shares: `--config FILE` and `key=value`s;
    `example`: overrides of this command's config, for its help (tests/test_cli.py parses them)."""
    parser.add_argument("--config", metavar="FILE", help="YAML config (defaults are used for what it omits), or the "
                        f"name of a shipped one: {', '.join(sorted(p.stem for p in SHIPPED.glob('*.yaml')))}")
    overrides = parser.add_argument("overrides", nargs="+", metavar="KEY=VALUE",
                                    help=f"config overrides, e.g. {example} (values parsed as YAML)")
    # An optional '+' positional rather than '*': argparse consumes an empty '*' together with an
    # earlier positional (`nasdose ensemble POOL.yaml --out D k=v` would then reject `k=v`).
    overrides.required, overrides.default = False, []
