"""A skip-free encoder–decoder: the one shape a dose prior can pretrain (FDP's stage I).

A U-Net's decoder reads its encoder's skips, so no decoder trained on doses alone can be reused
in it. `LatentNet`'s decoder sees only the latent grid at the deepest level, so the same decoder
decodes a dose autoencoder's latent (stage I, `nas_dose.training.prior`) and the image encoder's
(stage II). The registered `latent_dose_net` predicts a dose from the patient's input; its
`dose_autoencoder` (same widths and latent) encodes a dose and decodes it again.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import (
    ConvNormAct,
    DoubleConv,
    check_depth,
    check_positive,
    check_widths,
    conv,
    crop_to,
    downsample,
    pad_to_multiple,
    upsample,
)
from .registry import register_model

DIMS = 3


class LatentEncoder(nn.Sequential):
    """A DoubleConv per level, `len(widths) - 1` halvings, then a 1^3 conv to `latent` channels."""

    def __init__(self, in_channels: int, widths: Sequence[int], latent: int, norm: str, act: str,
                 down: str) -> None:
        layers: list[nn.Module] = [DoubleConv(DIMS, in_channels, widths[0], norm, act)]
        for prev, width in zip(widths[:-1], widths[1:]):
            layers += [downsample(down, prev, DIMS), DoubleConv(DIMS, prev, width, norm, act)]
        super().__init__(*layers, conv(DIMS, widths[-1], latent, kernel_size=1))


class LatentDecoder(nn.Sequential):
    """From the latent grid alone: a ConvNormAct to the deepest width, then per level a transposed
    conv up and a DoubleConv, and a 1^3 conv to the output."""

    def __init__(self, out_channels: int, widths: Sequence[int], latent: int, norm: str, act: str) -> None:
        layers: list[nn.Module] = [ConvNormAct(DIMS, latent, widths[-1], norm, act)]
        for deep, width in zip(widths[:0:-1], widths[-2::-1]):
            layers += [upsample(deep, width, DIMS), DoubleConv(DIMS, width, width, norm, act)]
        super().__init__(*layers, conv(DIMS, widths[0], out_channels, kernel_size=1))


class LatentNet(nn.Module):
    """`encoder` to a latent grid of `latent` channels at 1 / 2^(len(widths) - 1) of the input's
    size, `decoder` back to `out_channels`; any input size (padded, then cropped back)."""

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int], latent: int,
                 norm: str = "instance", act: str = "relu", down: str = "max_pool") -> None:
        super().__init__()
        in_channels = check_positive("in_channels", in_channels)
        out_channels = check_positive("out_channels", out_channels)
        latent = check_positive("latent", latent)
        widths = check_widths(widths)
        self.norm, self.factor = norm, 2 ** (len(widths) - 1)
        self.encoder = LatentEncoder(in_channels, widths, latent, norm, act, down)
        self.decoder = LatentDecoder(out_channels, widths, latent, norm, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-DIMS:]
        check_depth("latent net", size, self.factor, self.norm)
        return crop_to(self.decoder(self.encoder(pad_to_multiple(x, self.factor, DIMS))), size)


LATENT_WIDTHS = (16, 32, 64)
SMALL = {"widths": (4, 8), "latent": 4}


@register_model("latent_dose_net", small=SMALL, prior="dose_autoencoder")
def latent_dose_net(in_channels: int = 10, out_channels: int = 1, widths: Sequence[int] = LATENT_WIDTHS,
                    latent: int = 8, norm: str = "instance", act: str = "relu", down: str = "max_pool") -> LatentNet:
    """Patient input -> latent -> dose, without skips: a decoder a dose prior can pretrain
    (`train.prior`). norm, act, down as for unet3d."""
    return LatentNet(in_channels, out_channels, widths, latent, norm=norm, act=act, down=down)


@register_model("dose_autoencoder", small=SMALL, takes="dose")
def dose_autoencoder(out_channels: int = 1, widths: Sequence[int] = LATENT_WIDTHS, latent: int = 8,
                     norm: str = "instance", act: str = "relu", down: str = "max_pool") -> LatentNet:
    """Dose -> latent -> dose: the stage-I prior of `latent_dose_net` with the same arguments."""
    return LatentNet(out_channels, out_channels, widths, latent, norm=norm, act=act, down=down)
