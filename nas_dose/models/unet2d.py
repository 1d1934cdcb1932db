"""The 2D slice U-Net baseline of the DLMI challenge report, wrapped to take and return volumes.

It shows what the third dimension buys: the same U-Net recipe applied to each axial slice on its
own. Wrapping the slicing inside the model lets it share the training, prediction and scoring
code of the 3D models unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .registry import register_model
from .unet3d import UNet


@register_model("unet2d", small={"widths": (4, 8, 16)})
class SliceUNet2D(nn.Module):
    """2D U-Net (BasicBlocks of two 3x3 conv + BatchNorm + ReLU with dropout, max pooling,
    transposed-conv decoder) run on every slice along axis 2 (the axial axis, W of the tensor).

    The output is multiplied by the possible-dose mask, the last input channel, as in the
    report, so the prediction is exactly 0 where no dose is possible.
    """

    def __init__(self, in_channels: int = 10, out_channels: int = 1,
                 widths: Sequence[int] = (32, 64, 128, 256, 512), dropout: float = 0.1) -> None:
        super().__init__()
        self.net = UNet(2, in_channels, out_channels, widths, norm="batch", act="relu",
                        dropout=dropout, down="max_pool")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, d, h, w = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(n * w, c, d, h)
        y = self.net(slices)
        y = y.reshape(n, w, y.shape[1], d, h).permute(0, 2, 3, 4, 1)
        return y * x[:, -1:]
