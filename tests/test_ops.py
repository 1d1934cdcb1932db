"""The op registry and every registered op: shapes at even and odd sizes, gradients, training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nas_dose.errors import NasDoseError
from nas_dose.search_spaces import count_flops, count_params, get_op, list_ops, make_op, register_op
from nas_dose.search_spaces import ops as ops_module

LENAS_OPS = {
    "cell": ["identity", "se_conv", "dil_conv", "dep_conv", "conv"],
    "connect": ["identity", "none"],
    "down": ["avg_pool", "max_pool", "down_se_conv", "down_dil_conv", "down_dep_conv", "down_conv"],
    "up": ["up_se_conv", "up_dep_conv", "up_conv", "up_dil_conv", "up_interpolate"],
}
CONSTANT_OPS = {"zero", "none"}  # output zeros whatever the input: nothing to train
OP_KINDS = [(name, kind) for name in list_ops() for kind in get_op(name).kinds]
SIZES = [(8, 8, 8), (9, 9, 9), (7, 8, 9)]


def run(op: nn.Module, kind: str, x: torch.Tensor, size) -> torch.Tensor:
    return op(x, size) if kind == "up" else op(x)


def in_size(kind: str, out_size) -> tuple[int, ...]:
    """The input size an op of ``kind`` needs to produce ``out_size`` (an up op's input is the half)."""
    return tuple(math.ceil(s / 2) for s in out_size) if kind == "up" else tuple(out_size)


def expected_size(kind: str, size) -> tuple[int, ...]:
    return tuple(math.ceil(s / 2) for s in size) if kind == "down" else tuple(size)


def test_registry_holds_every_lenas_candidate_with_its_kind():
    for kind, names in LENAS_OPS.items():
        assert set(names) <= set(list_ops(kind)), kind
    for name in ["conv_k5", "dep_conv_k5", "zero", "res_conv"]:
        assert get_op(name).kinds == ("cell",)
    assert len(list_ops()) == len(set(list_ops()))
    assert all(get_op(n).doc for n in list_ops()), "every op has a one-line description"


def test_registry_errors():
    with pytest.raises(NasDoseError, match="unknown op 'nope'"):
        get_op("nope")
    with pytest.raises(NasDoseError, match="already registered"):
        register_op("conv", "cell")(ops_module.Identity)
    with pytest.raises(NasDoseError, match="unknown kind"):
        register_op("fresh_op", "sideways")
    with pytest.raises(NasDoseError, match="identifier"):
        register_op("has.dot", "cell")
    with pytest.raises(NasDoseError, match="slot 'down.down': op 'conv' is a cell op, not a down op"):
        make_op("conv", "down", 4, 4, slot="down.down")


@pytest.mark.parametrize("name,kind", OP_KINDS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("c_in,c_out", [(4, 4), (3, 6)])
def test_output_shape(name, kind, size, c_in, c_out):
    op = make_op(name, kind, c_in, c_out)
    x = torch.randn(2, c_in, *in_size(kind, size))
    y = run(op, kind, x, size)
    assert y.shape == (2, c_out, *expected_size(kind, size))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name,kind", OP_KINDS)
def test_gradients_reach_every_parameter_and_the_input(name, kind):
    torch.manual_seed(0)
    op = make_op(name, kind, 3, 5)
    x = torch.randn(1, 3, *in_size(kind, (7, 8, 9)), requires_grad=True)
    y = run(op, kind, x, (7, 8, 9))
    if name in CONSTANT_OPS:
        assert not y.any() and not y.requires_grad and count_params(op) == 0
        return
    (y * torch.randn_like(y)).sum().backward()
    for pname, p in op.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    assert x.grad is not None and x.grad.abs().sum() > 0


class _TinyNet(nn.Module):
    """1×1×1 conv (3 -> 4 channels), the op (4 -> 4), 1×1×1 conv to one channel."""

    def __init__(self, op: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.inp, self.op, self.out = nn.Conv3d(3, 4, 1), op, nn.Conv3d(4, 1, 1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.out(run(self.op, self.kind, self.inp(x), size))


def _problem(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed input and a target that every op of ``kind`` can express, at odd/even sizes.

    cell/connect: copy channel 0; down: 3×3×3 stride-2 average of a smooth field's channel 0;
    up: trilinear ×2 of channel 0 (so every output voxel must depend on the input).
    """
    g = torch.Generator().manual_seed(0)
    if kind == "up":
        x = torch.randn(1, 3, 4, 4, 4, generator=g)
        return x, F.interpolate(x[:, :1], size=(7, 8, 7), mode="trilinear")
    if kind == "down":
        x = F.interpolate(torch.randn(1, 3, 3, 3, 3, generator=g), size=(7, 8, 7), mode="trilinear")
        x = x / x.std()
        return x, F.avg_pool3d(x[:, :1], 3, 2, 1, count_include_pad=False)
    x = torch.randn(1, 3, 7, 8, 7, generator=g)
    return x, x[:, :1].clone()


def _fit(op: nn.Module, kind: str, steps: int = 80) -> tuple[float, float, float]:
    """Train the tiny net with Adam; return (first loss, last loss, target variance)."""
    x, target = _problem(kind)
    net = _TinyNet(op, kind)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(net(x, target.shape[2:]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1], target.var().item()


@pytest.mark.parametrize("name,kind", [(n, k) for n, k in OP_KINDS if n not in CONSTANT_OPS])
def test_every_op_trains(name, kind):
    torch.manual_seed(0)
    first, last, var = _fit(make_op(name, kind, 4, 4), kind)
    assert last < 0.25 * first and last < 0.25 * var, (first, last, var)


class _LiteralTransposedDilatedUp(nn.Module):
    """LENAS's up_dil_conv taken literally: transposed conv, kernel 3, dilation 2, stride 2."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(c_in, c_out, 3, stride=2, padding=2, dilation=2, bias=False)
        self.tail = nn.Sequential(nn.InstanceNorm3d(c_out, affine=True), nn.ReLU())

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.tail(self.up(x, output_size=list(size)))


def test_the_training_check_rejects_lenas_literal_up_dil_conv():
    """The check above has teeth: the literal op leaves 7 of 8 voxels without input and fails it."""
    torch.manual_seed(0)
    first, last, var = _fit(_LiteralTransposedDilatedUp(4, 4), "up")
    assert last > 0.5 * var


def test_count_params_and_flops_of_a_conv_op():
    op = make_op("conv", "cell", 4, 6)
    assert count_params(op) == 4 * 6 * 27 + 2 * 6  # bias-free conv + InstanceNorm affine
    assert count_flops(op, (1, 4, 8, 8, 8)) == 2 * 4 * 6 * 27 * 8 ** 3
    down = make_op("down_conv", "down", 4, 6)
    assert count_flops(down, (1, 4, 9, 9, 9)) == 2 * 4 * 6 * 27 * 5 ** 3
