"""Reference models and the model registry; importing this package registers the models."""
from . import latent, unet2d, unet3d  # noqa: F401  (registration)
from .registry import create_model, list_models, prior_of, register_model, small_kwargs

__all__ = ["create_model", "list_models", "prior_of", "register_model", "small_kwargs"]
