"""Reference models and the model registry; importing this package registers the models."""
from .registry import create_model, list_models, register_model, small_kwargs
from . import unet2d, unet3d  # noqa: F401  (registration)

__all__ = ["create_model", "list_models", "register_model", "small_kwargs"]
