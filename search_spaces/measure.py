"""Model size and cost: parameter count and FLOPs of any network at any input size."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

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
        meta_forward(model, input_shape)
    return int(counter.get_total_flops())


def meta_forward(model: nn.Module, input_shape: Sequence[int],
                 prepare: Callable[[nn.Module], object] | None = None) -> torch.Tensor:
    """One forward pass of a copy of `model` on the meta device: shapes only, nothing computed or
    allocated, so any input size is cheap; a shape error surfaces as it would on real data.
    `prepare` sees the copy first (to hook its modules)."""
    meta = copy.deepcopy(model).to("meta")
    if prepare is not None:
        prepare(meta)
    with torch.no_grad():
        return meta(torch.empty(tuple(input_shape), device="meta"))
