"""The hand-designed U-Net reference model: the yardstick every searched network must beat.

`UNet` is written for 2 or 3 spatial dimensions so the 2D slice baseline reuses it; the
registered `unet3d` is its 3D form.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from .blocks import (
    DoubleConv,
    check_depth,
    check_dropout,
    check_positive,
    check_widths,
    conv,
    crop_to,
    downsample,
    pad_to_multiple,
    upsample,
)
from .registry import register_model


class UNet(nn.Module):
    """U-Net: a DoubleConv per level, `len(widths) - 1` halvings, transposed-conv upsampling,
    skip concatenation, 1^dims output conv.

    Any input size works: the input is zero-padded to a multiple of 2^depth and the output
    cropped back, so the prediction has the input's spatial size.
    """

    def __init__(self, dims: int, in_channels: int, out_channels: int, widths: Sequence[int],
                 norm: str = "instance", act: str = "relu", dropout: float = 0.0,
                 down: str = "max_pool") -> None:
        super().__init__()
        in_channels = check_positive("in_channels", in_channels)
        out_channels = check_positive("out_channels", out_channels)
        widths = check_widths(widths)
        dropout = check_dropout(dropout)
        self.dims, self.norm = dims, norm
        self.factor = 2 ** (len(widths) - 1)
        block = partial(DoubleConv, dims, norm=norm, act=act, dropout=dropout)
        self.encoders = nn.ModuleList([block(in_channels, widths[0])])
        self.downs = nn.ModuleList()
        for prev, width in zip(widths[:-1], widths[1:]):
            self.downs.append(downsample(down, prev, dims))
            self.encoders.append(block(prev, width))
        # Decoder levels from the deepest up: up[i] maps widths[i+1] -> widths[i].
        self.ups = nn.ModuleList(upsample(w_deep, w, dims) for w, w_deep in zip(widths[:-1], widths[1:]))
        self.decoders = nn.ModuleList(block(2 * w, w) for w in widths[:-1])
        self.head = conv(dims, widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-self.dims:]
        check_depth("U-Net", size, self.factor, self.norm)
        h = pad_to_multiple(x, self.factor, self.dims)
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                h = self.downs[i - 1](h)
            h = encoder(h)
            skips.append(h)
        h = skips.pop()
        for i in reversed(range(len(self.ups))):
            h = self.decoders[i](torch.cat([skips[i], self.ups[i](h)], dim=1))
        return crop_to(self.head(h), size)


UNET3D_WIDTHS = (16, 32, 64, 128, 256)  # the standard 3D U-Net's levels


@register_model("unet3d", small={"widths": (4, 8, 16)})
def unet3d(in_channels: int = 10, out_channels: int = 1,
           widths: Sequence[int] = UNET3D_WIDTHS, norm: str = "instance",
           act: str = "relu", dropout: float = 0.0, down: str = "max_pool") -> UNet:
    """3D U-Net on (N, C, D, H, W) volumes. norm: instance | batch; act: relu | leaky_relu;
    down: max_pool | conv (a learned 2x2x2 stride-2 conv)."""
    return UNet(3, in_channels, out_channels, widths, norm=norm, act=act, dropout=dropout, down=down)
