"""The full-resolution stage of a cascade as a model: any network, one input channel wider (the
upsampled coarse dose), whose output is added to that channel (`nas_dose.cascade`)."""
from __future__ import annotations

import torch
from torch import nn

from ..data.dataset import IN_CHANNELS
from ..errors import NasDoseError

REFINER_CHANNELS = IN_CHANNELS + 1  # the model input, then the upsampled coarse dose / 70 Gy


class Refiner(nn.Module):
    """The full-resolution stage: input channel -1 (coarse dose / 70 Gy) plus `net`'s correction.

    The last convolution of `net` starts at zero, so training starts from the coarse dose itself.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d))]
        if not convs:
            raise NasDoseError(f"{type(net).__name__}: a refiner needs a network ending in a convolution")
        nn.init.zeros_(convs[-1].weight)
        if convs[-1].bias is not None:
            nn.init.zeros_(convs[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1:] + self.net(x)
