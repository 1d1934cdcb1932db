"""Model size and cost: parameter count and FLOPs of any network at any input size."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared parameter once)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on an input of ``input_shape`` (N, C, D, H, W).

    Counted by ``torch.utils.flop_counter`` (2 per multiply-add of convolutions and matrix
    products; norms, activations and pooling are not counted), on a copy of the model on the
    meta device, so nothing is computed or allocated: any input size is cheap.
    """
    meta = copy.deepcopy(model).to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(torch.empty(tuple(input_shape), device="meta"))
    return int(counter.get_total_flops())
