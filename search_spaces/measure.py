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
    with FlopCounterMode(display=False) as counter:
        meta_forward(meta_copy(model), input_shape)
    return int(counter.get_total_flops())


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device: shapes only, nothing allocated."""
    return copy.deepcopy(model).to("meta")


def meta_forward(meta: nn.Module, input_shape: Sequence[int], *more_shapes: Sequence[int]) -> torch.Tensor:
    """One forward pass of a `meta_copy`: nothing is computed, so any input size is cheap, and a
    shape error surfaces as it would on real data. `more_shapes`: of more inputs a network takes
    (a conditioned network's preferences)."""
    with torch.no_grad():
        return meta(*(torch.empty(tuple(shape), device="meta") for shape in (input_shape, *more_shapes)))
