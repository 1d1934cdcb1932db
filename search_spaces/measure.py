"""Model size and cost: parameter count and FLOPs of any network at any input size, and its
measured forward latency on a device."""
from __future__ import annotations

import contextlib
import copy
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from time import perf_counter
from typing import Any, Sequence

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


def forward_latency(model: nn.Module, input_shape: Sequence[int], device: torch.device, runs: int = 5,
                    warmup: int = 1,
                    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> float:
    """Median seconds of `runs` forward passes of a copy of `model` on `device` (the model itself
    stays where it is), on zeros of ``input_shape``, after `warmup` untimed passes (allocation,
    cuDNN autotuning), in eval mode without autograd, under `autocast` (e.g. a Runtime's). On
    CUDA the device is synchronized around each timed pass, since kernels run asynchronously."""
    net = copy.deepcopy(model).to(device).eval()
    x = torch.zeros(tuple(input_shape), device=device)
    cuda = device.type == "cuda"
    times = []
    with torch.inference_mode(), autocast():
        for i in range(warmup + runs):
            if cuda:
                torch.cuda.synchronize(device)
            start = perf_counter()
            net(x)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(perf_counter() - start)
    return statistics.median(times)
