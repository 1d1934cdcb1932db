"""Model registry (timm style): models are created by name, so configs, checkpoints and the CLI
refer to an architecture by a string, and tests can run over every registered model.

A name `package.module:attr` loads a model from outside nasdose without registering it. The
registry is a `nas_dose.registry.Registry`, so models, ops, spaces and strategies behave alike.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, TypeVar

from torch import nn

from ..errors import NasDoseError
from ..registry import Registry, qualname

F = TypeVar("F", bound=Callable[..., nn.Module])
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str, *, small: Mapping[str, Any] | None = None, prior: str | None = None,
                   takes: str = "patient") -> Callable[[F], F]:
    """Decorator registering a model class or factory under `name`.

    `small`: keyword arguments of a small, fast instance (a few thousand parameters, inputs of
    16 voxels a side work), used by the tests that run over every model and by smoke runs.
    `prior`: the registered dose autoencoder whose decoder this model can start from
    (`train.prior`), called with this model's arguments but `in_channels`. `takes`: "patient"
    (a dose predictor: the patient's input channels) or "dose" (a prior's autoencoder).
    """
    if takes not in TAKES:
        raise ValueError(f"register_model: takes must be one of {TAKES}, got {takes!r}")
    return MODELS.register(name, small=dict(small or {}), prior=prior, takes=takes)


TAKES = ("patient", "dose")


def list_models(takes: str = "patient") -> list[str]:
    """Names of the registered models taking `takes` (dose predictors by default), sorted."""
    return [n for n in MODELS.names() if model_takes(n) == takes]


def model_takes(name: str) -> str:
    """What the registered model `name` takes: "patient" (a dose predictor) or "dose"."""
    return str(MODELS.get(name).meta.get("takes", "patient"))


def prior_of(name: str) -> str | None:
    """The registered dose autoencoder a model's decoder can be pretrained as (None: none)."""
    return MODELS.get(name).meta.get("prior")


def small_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments of a small instance of the registered model `name`."""
    return dict(MODELS.get(name).meta.get("small", {}))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as `name` (or imported from `package.module:attr`).

    Unknown or missing arguments and invalid values are NasDoseErrors that name the model and
    the argument, so a config typo fails before any training starts.
    """
    factory = MODELS.get(name).obj
    _check_arguments(name, factory, kwargs)
    try:
        model = factory(**kwargs)
    except NasDoseError as e:
        raise NasDoseError(f"model '{name}': {e}") from None
    if not isinstance(model, nn.Module):
        raise NasDoseError(f"model '{name}': {qualname(factory)} returned {type(model).__name__}, "
                           "not a torch.nn.Module")
    return model


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

