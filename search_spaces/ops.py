"""The candidate-op registry: every op a search space may place in a slot, in one place.

An op is registered under a unique name with the slot kinds it can fill:

- ``cell``: inside a cell, ``forward(x)`` keeps the spatial size (op1, op2);
- ``connect``: the branch from the cell's ``pre`` output, ``forward(x)`` keeps the size;
- ``down``: ``forward(x)`` maps each spatial size n to ceil(n / 2) (odd sizes work);
- ``up``: ``forward(x, size)`` upsamples ×2 to exactly ``size`` (the skip's spatial size).

A factory is called as ``factory(c_in, c_out)`` and returns a plain ``torch.nn.Module``. Every
convolution is 3×3×3 unless its name says otherwise and is followed by InstanceNorm + ReLU, as
in LENAS. Convolutions have no bias: the InstanceNorm that follows would cancel it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nas_dose.errors import NasDoseError
from nas_dose.registry import Registry

OpKind = Literal["cell", "connect", "down", "up"]
KINDS: tuple[str, ...] = ("cell", "connect", "down", "up")
Factory = Callable[..., nn.Module]
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class OpSpec:
    """What a builder needs to place an op: its name, the slot kinds it fits, its factory."""

    name: str
    kinds: tuple[str, ...]
    factory: Factory
    doc: str = ""

    def build(self, c_in: int, c_out: int, **kw) -> nn.Module:
        return self.factory(c_in, c_out, **kw)


OPS: Registry[Factory] = Registry("op", paths_need_registration=True)


def register_op(name: str, kind: OpKind | Sequence[OpKind], doc: str = "") -> Callable[[Factory], Factory]:
    """Decorator registering a factory ``(c_in, c_out, **kw) -> nn.Module`` under ``name``.

    ``kind`` may be a tuple when one op fits several slot kinds (``identity`` is both a cell op
    and a connect op). Names are unique and contain no dots (they become module names).
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise NasDoseError(f"op '{name}': unknown kind {bad or kinds} (known: {', '.join(KINDS)})")
    if not _NAME.match(name):
        raise NasDoseError(f"op '{name}': an op name must be an identifier (letters, digits, _)")

    def decorate(factory: Factory) -> Factory:
        text = doc or (factory.__doc__ or "").strip().split("\n")[0]
        return OPS.register(name, kinds=kinds, doc=text)(factory)

    return decorate


def get_op(name: str) -> OpSpec:
    """The op registered as ``name`` (or, by import path, the registered op of that factory)."""
    entry = OPS.get(name)
    return OpSpec(entry.name, entry.meta["kinds"], entry.obj, entry.meta["doc"])


def list_ops(kind: OpKind | None = None) -> list[str]:
    """Registered op names (of one kind, if given), sorted."""
    if kind is not None and kind not in KINDS:
        raise NasDoseError(f"op kind '{kind}': unknown (known: {', '.join(KINDS)})")
    return [n for n in OPS.names() if kind is None or kind in get_op(n).kinds]


def make_op(name: str, kind: str, c_in: int, c_out: int, slot: str = "") -> nn.Module:
    """Build op ``name`` for a slot of ``kind``; an op of the wrong kind is an error naming the slot."""
    spec = get_op(name)
    if kind not in spec.kinds:
        where = f"slot '{slot}': " if slot else ""
        raise NasDoseError(f"{where}op '{name}' is a {'/'.join(spec.kinds)} op, not a {kind} op")
    return spec.build(c_in, c_out)


# ---------------------------------------------------------------------------------------------
# building blocks


class SqueezeExcite(nn.Module):
    """Channel gate: global average -> bottleneck -> sigmoid, multiplied onto the input."""

    def __init__(self, c: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(2, c // reduction)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(c, hidden, 1), nn.ReLU(),
                                  nn.Conv3d(hidden, c, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def _tail(c_in: int, c_out: int, depthwise: bool, se: bool) -> list[nn.Module]:
    """What follows the spatial conv: pointwise mix (depthwise ops), norm, ReLU, SE gate."""
    layers: list[nn.Module] = [nn.Conv3d(c_in, c_out, 1, bias=False)] if depthwise else []
    return layers + [nn.InstanceNorm3d(c_out, affine=True), nn.ReLU()] + ([SqueezeExcite(c_out)] if se else [])


def conv_op(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, dilation: int = 1,
            depthwise: bool = False, se: bool = False) -> nn.Sequential:
    """Conv + InstanceNorm + ReLU: plain, dilated, depthwise-separable or SE-gated.

    'Same' padding, so the output size is ceil(n / stride) for odd and even n alike.
    """
    pad = dilation * (kernel - 1) // 2
    mid = c_in if depthwise else c_out
    conv = nn.Conv3d(c_in, mid, kernel, stride, pad, dilation, groups=c_in if depthwise else 1, bias=False)
    return nn.Sequential(conv, *_tail(c_in, c_out, depthwise, se))


class Identity(nn.Module):
    """Pass-through; a 1×1×1 projection when the channel count changes."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.proj = conv_op(c_in, c_out, kernel=1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Zero(nn.Module):
    """Outputs zeros: the 'no connection' choice, and a supernet candidate that drops a path."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.c_out = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0], self.c_out, *x.shape[2:]))


class ResidualConv(nn.Module):
    """Two conv + InstanceNorm layers with an identity (or 1×1×1 projected) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_op(c_in, c_out), nn.Conv3d(c_out, c_out, 3, padding=1, bias=False),
                                  nn.InstanceNorm3d(c_out, affine=True))
        self.shortcut = nn.Conv3d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Pool(nn.Module):
    """3×3×3 stride-2 pooling (n -> ceil(n / 2)); a 1×1×1 projection when channels change."""

    def __init__(self, c_in: int, c_out: int, mode: Literal["avg", "max"]) -> None:
        super().__init__()
        if mode == "avg":
            self.pool: nn.Module = nn.AvgPool3d(3, 2, 1, count_include_pad=False)
        else:
            self.pool = nn.MaxPool3d(3, 2, 1)
        self.proj = conv_op(c_in, c_out, kernel=1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x))


class TransposedUp(nn.Module):
    """Transposed 3×3×3 conv, stride 2, to an exact output size (2n - 1 or 2n), then the tail.

    Kernel 3 with stride 2 and padding 1 covers every output voxel (no checkerboard holes).
    """

    def __init__(self, c_in: int, c_out: int, depthwise: bool = False, se: bool = False) -> None:
        super().__init__()
        mid = c_in if depthwise else c_out
        self.up = nn.ConvTranspose3d(c_in, mid, 3, stride=2, padding=1, groups=c_in if depthwise else 1, bias=False)
        self.tail = nn.Sequential(*_tail(c_in, c_out, depthwise, se))

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.tail(self.up(x, output_size=list(size)))


class InterpolateUp(nn.Module):
    """LENAS up_interpolate: conv + InstanceNorm + ReLU, then trilinear resize to ``size``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = conv_op(c_in, c_out)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.interpolate(self.conv(x), size=list(size), mode="trilinear", align_corners=False)


class DilatedUp(nn.Module):
    """up_dil_conv done so that it trains: trilinear ×2, then a 3×3×3 dilation-2 conv.

    The literal op (transposed conv, kernel 3, dilation 2, stride 2) places its three taps two
    voxels apart on a stride-2 grid, so every tap of every input voxel lands on the same parity:
    for any padding, 7 of 8 output voxels receive no input at all and stay constant. That is
    why LENAS networks with up_dil_conv failed. Interpolating first and then applying the
    dilated kernel keeps the op's receptive field (5 voxels at the output grid) and is dense.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = conv_op(c_in, c_out, dilation=2)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=list(size), mode="trilinear", align_corners=False))


# ---------------------------------------------------------------------------------------------
# registrations: the LENAS candidates, then the extended set

register_op("identity", ("cell", "connect"))(Identity)
register_op("none", "connect", doc="No connection (adds nothing).")(Zero)
register_op("zero", "cell")(Zero)
register_op("conv", "cell", doc="3×3×3 conv.")(conv_op)
register_op("se_conv", "cell", doc="3×3×3 conv with a squeeze-excitation gate.")(partial(conv_op, se=True))
register_op("dil_conv", "cell", doc="3×3×3 conv, dilation 2.")(partial(conv_op, dilation=2))
register_op("dep_conv", "cell", doc="3×3×3 depthwise + 1×1×1 pointwise conv.")(partial(conv_op, depthwise=True))
register_op("conv_k5", "cell", doc="5×5×5 conv.")(partial(conv_op, kernel=5))
register_op("dep_conv_k5", "cell", doc="5×5×5 depthwise + 1×1×1 pointwise conv.")(
    partial(conv_op, kernel=5, depthwise=True))
register_op("res_conv", "cell")(ResidualConv)

register_op("avg_pool", "down", doc="3×3×3 average pooling, stride 2.")(partial(Pool, mode="avg"))
register_op("max_pool", "down", doc="3×3×3 max pooling, stride 2.")(partial(Pool, mode="max"))
register_op("down_conv", "down", doc="3×3×3 conv, stride 2.")(partial(conv_op, stride=2))
register_op("down_se_conv", "down", doc="3×3×3 conv, stride 2, SE gate.")(partial(conv_op, stride=2, se=True))
register_op("down_dil_conv", "down", doc="3×3×3 conv, dilation 2, stride 2.")(
    partial(conv_op, stride=2, dilation=2))
register_op("down_dep_conv", "down", doc="3×3×3 depthwise conv, stride 2, + pointwise.")(
    partial(conv_op, stride=2, depthwise=True))
register_op("down_conv_k5", "down", doc="5×5×5 conv, stride 2.")(partial(conv_op, kernel=5, stride=2))

register_op("up_conv", "up", doc="3×3×3 transposed conv, stride 2.")(TransposedUp)
register_op("up_se_conv", "up", doc="3×3×3 transposed conv, stride 2, SE gate.")(partial(TransposedUp, se=True))
register_op("up_dep_conv", "up", doc="3×3×3 depthwise transposed conv, stride 2, + pointwise.")(
    partial(TransposedUp, depthwise=True))
register_op("up_dil_conv", "up")(DilatedUp)
register_op("up_interpolate", "up")(InterpolateUp)
