"""Model registry (timm style): models are created by name, so configs, checkpoints and the CLI
refer to an architecture by a string, and tests can run over every registered model.

A name `package.module:attr` loads a model from outside nasdose without registering it.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping, TypeVar

from torch import nn

from ..errors import NasDoseError

F = TypeVar("F", bound=Callable[..., nn.Module])


class _Entry:
    """A registered factory and the arguments of a small instance of it."""

    def __init__(self, factory: Callable[..., nn.Module], small: Mapping[str, Any]) -> None:
        self.factory = factory
        self.small = dict(small)


_MODELS: dict[str, _Entry] = {}


def register_model(name: str, *, small: Mapping[str, Any] | None = None) -> Callable[[F], F]:
    """Decorator registering a model class or factory under `name`.

    `small`: keyword arguments of a small, fast instance (a few thousand parameters, inputs of
    16 voxels a side work), used by the tests that run over every model and by smoke runs.
    """

    def decorate(factory: F) -> F:
        if not callable(factory):
            raise NasDoseError(f"model '{name}': {factory!r} is not a class or function")
        existing = _MODELS.get(name)
        if existing is not None and existing.factory is not factory:
            raise NasDoseError(f"model '{name}': already registered by {_qualname(existing.factory)}")
        _MODELS[name] = _Entry(factory, small or {})
        return factory

    return decorate


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def small_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments of a small instance of the registered model `name`."""
    return dict(_entry(name).small)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as `name` (or imported from `package.module:attr`).

    Unknown or missing arguments and invalid values are NasDoseErrors that name the model and
    the argument, so a config typo fails before any training starts.
    """
    factory = _import(name) if ":" in name else _entry(name).factory
    _check_arguments(name, factory, kwargs)
    try:
        model = factory(**kwargs)
    except NasDoseError as e:
        raise NasDoseError(f"model '{name}': {e}") from None
    if not isinstance(model, nn.Module):
        raise NasDoseError(f"model '{name}': {_qualname(factory)} returned {type(model).__name__}, "
                           "not a torch.nn.Module")
    return model


def _entry(name: str) -> _Entry:
    if name not in _MODELS:
        raise NasDoseError(f"model '{name}': unknown (known: {', '.join(list_models())}; "
                           "or give package.module:attr)")
    return _MODELS[name]


def _import(name: str) -> Callable[..., nn.Module]:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise NasDoseError(f"model '{name}': cannot import module '{module_name}' ({e})") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise NasDoseError(f"model '{name}': module '{module_name}' has no attribute '{attr}'")
    if not callable(factory):
        raise NasDoseError(f"model '{name}': '{attr}' is not a class or function")
    return factory


def _check_arguments(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: let the call decide
        return
    params = signature.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
        for key in kwargs:
            if key not in accepted:
                raise NasDoseError(f"model '{name}': unknown argument '{key}' "
                                   f"(arguments: {', '.join(accepted)})")
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        raise NasDoseError(f"model '{name}': {e}") from None


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
