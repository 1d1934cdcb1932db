"""Layer factories and conv blocks shared by the reference models, for 2D and 3D alike.

The factories take the number of spatial dimensions, so one block definition serves the 3D U-Net
and the 2D slice U-Net (MONAI-style), and every choice a user can configure is checked here once.
"""
from __future__ import annotations

from types import EllipsisType
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NasDoseError

NORMS = ("instance", "batch")
ACTS = ("relu", "leaky_relu")
DOWNS = ("max_pool", "conv")

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {("instance", 2): nn.InstanceNorm2d, ("instance", 3): nn.InstanceNorm3d,
         ("batch", 2): nn.BatchNorm2d, ("batch", 3): nn.BatchNorm3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def check_choice(arg: str, value: object, choices: Sequence[str]) -> None:
    """Reject a configurable option outside `choices`, naming the argument."""
    if value not in choices:
        raise NasDoseError(f"argument '{arg}': expected one of {', '.join(map(repr, choices))}, "
                           f"got {value!r}")


def check_widths(widths: object) -> tuple[int, ...]:
    """Channel widths of a U-Net, one per level: at least two positive integers."""
    if (not isinstance(widths, (list, tuple)) or len(widths) < 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)):
        raise NasDoseError(f"argument 'widths': expected at least two positive integers, got {widths!r}")
    return tuple(widths)


def check_positive(arg: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NasDoseError(f"argument '{arg}': expected a positive integer, got {value!r}")
    return value


def check_dropout(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise NasDoseError(f"argument 'dropout': expected a probability in [0, 1), got {value!r}")
    return float(value)


def check_depth(what: str, size: Sequence[int], factor: int, norm: str) -> None:
    """Instance norm needs more than one voxel: refuse an input whose deepest level (after padding
    to a multiple of `factor`) would be one voxel a side, in one line."""
    if norm == "instance" and any(-(-n // factor) < 2 for n in size):
        raise NasDoseError(f"{what}: an input of {'x'.join(map(str, size))} voxels is too small for "
                           f"{factor.bit_length()} levels with instance norm (the deepest would be 1 "
                           "voxel a side); use fewer widths or a larger grid")


def conv(dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
         bias: bool = True) -> nn.Module:
    """A convolution that keeps the spatial size at stride 1 (odd kernels, 'same' padding)."""
    return _CONV[dims](in_channels, out_channels, kernel_size, stride=stride,
                       padding=(kernel_size - 1) // 2, bias=bias)


def norm_layer(kind: str, channels: int, dims: int) -> nn.Module:
    """Instance norm is affine here, so both kinds carry the same learnable scale and shift."""
    check_choice("norm", kind, NORMS)
    cls = _NORM[(kind, dims)]
    return cls(channels, affine=True) if kind == "instance" else cls(channels)


def act_layer(kind: str) -> nn.Module:
    check_choice("act", kind, ACTS)
    return nn.ReLU(inplace=True) if kind == "relu" else nn.LeakyReLU(0.01, inplace=True)


class ConvNormAct(nn.Sequential):
    """3^dims conv (no bias: the norm's shift replaces it) -> norm -> activation -> dropout."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, norm: str = "instance",
                 act: str = "relu", dropout: float = 0.0) -> None:
        layers = [conv(dims, in_channels, out_channels, bias=False),
                  norm_layer(norm, out_channels, dims), act_layer(act)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """Two ConvNormAct: the per-level block of a U-Net (the BasicBlock of the 2D baseline)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, norm: str = "instance",
                 act: str = "relu", dropout: float = 0.0) -> None:
        super().__init__(ConvNormAct(dims, in_channels, out_channels, norm, act, dropout),
                         ConvNormAct(dims, out_channels, out_channels, norm, act, dropout))


def downsample(kind: str, channels: int, dims: int) -> nn.Module:
    """Halve every spatial size: max pooling, or a learned 2^dims stride-2 conv."""
    check_choice("down", kind, DOWNS)
    if kind == "max_pool":
        return _POOL[dims](2)
    return _CONV[dims](channels, channels, 2, stride=2)


def upsample(in_channels: int, out_channels: int, dims: int) -> nn.Module:
    """Double every spatial size with a 2^dims stride-2 transposed conv."""
    return _CONV_T[dims](in_channels, out_channels, 2, stride=2)


def pad_to_multiple(x: torch.Tensor, factor: int, dims: int) -> torch.Tensor:
    """Zero-pad the last `dims` axes at their far end up to a multiple of `factor`, so that
    every downsampling halves exactly and the skip connections line up for any input size."""
    pads: list[int] = []
    for size in reversed(x.shape[-dims:]):
        pads += [0, (-size) % factor]
    return F.pad(x, pads) if any(pads) else x


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Undo `pad_to_multiple`: keep the first `size` voxels of the last len(size) axes."""
    index: tuple[EllipsisType | slice, ...] = (Ellipsis, *(slice(0, s) for s in size))
    return x[index]
