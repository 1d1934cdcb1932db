"""The LENAS cell and the macro 3D U-Net around it, shared by final networks and the supernet.

A slot of a cell is whatever module the slot factory returns: a single op in a final network,
a MixedOp in the supernet. Both are built by this code, so the search evaluates exactly the
network that is later built (LENAS's published search cell and trained cell differed).

Macro layout (resolution level k has spatial size ceil(n / 2^k) and width c(k) = stem for
k = 0, widths[k - 1] otherwise; depth = len(widths)):

    stem: conv(in_channels -> c(0)) at level 0
    encoder cell i (i = 0 .. depth-1): body at level i on c(i) channels -> skip i;
        its down op maps c(i) -> c(i+1) and level i -> i+1
    decoder cell j (j = depth-1 .. 0): input at level j+1 (c(depth) channels at the bottom,
        else 2·c(j+1) = previous up output ⊕ skip j+1), body on c(j+1) channels, up op to
        c(j) channels at skip j's exact size; the result is concatenated with skip j
    head: 1×1×1 conv, 2·c(0) -> out_channels (linear: models predict dose / 70)

The bottom level is processed by the deepest decoder cell's body.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from nas_dose.errors import NasDoseError

from .ops import conv_op

# (slot name, slot kind, c_in, c_out) -> module for that slot
SlotFactory = Callable[[str, str, int, int], nn.Module]

ROLES: dict[str, tuple[str, ...]] = {"down": ("op1", "op2", "connect", "down"),
                                     "up": ("op1", "op2", "connect", "up")}
ROLE_KIND = {"op1": "cell", "op2": "cell", "connect": "connect", "down": "down", "up": "up"}


def cell_slots(prefix: str, direction: str) -> list[str]:
    """The slot names of one cell design, e.g. ``down.op1 … down.down`` for prefix ``down``."""
    return [f"{prefix}.{role}" for role in ROLES[direction]]


class Cell(nn.Module):
    """pre (conv + InstanceNorm + ReLU) -> op1 -> op2, + connect(pre), then the down or up op."""

    def __init__(self, prefix: str, direction: str, c_in: int, c_body: int, c_out: int, make: SlotFactory) -> None:
        super().__init__()
        self.direction = direction
        self.pre = conv_op(c_in, c_body)
        self.op1 = make(f"{prefix}.op1", "cell", c_body, c_body)
        self.op2 = make(f"{prefix}.op2", "cell", c_body, c_body)
        self.connect = make(f"{prefix}.connect", "connect", c_body, c_body)
        self.resample = make(f"{prefix}.{direction}", direction, c_body, c_out)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (body output, resampled output); up cells need the output ``size``."""
        p = self.pre(x)
        h = self.op2(self.op1(p)) + self.connect(p)
        return h, (self.resample(h) if size is None else self.resample(h, size))


class CellUNet(nn.Module):
    """The macro U-Net: one cell per encoder and decoder level, named by slot prefixes."""

    def __init__(self, macro: Mapping, encoder: Sequence[str], decoder: Sequence[str], make: SlotFactory) -> None:
        super().__init__()
        widths = [int(macro["stem"]), *(int(w) for w in macro["widths"])]
        self.depth = depth = len(widths) - 1
        if len(encoder) != depth or len(decoder) != depth:
            raise NasDoseError(f"macro: {depth} levels need {depth} encoder and decoder cells, "
                               f"got {len(encoder)} and {len(decoder)}")
        self.stem = conv_op(int(macro["in_channels"]), widths[0])
        self.encoder = nn.ModuleList(
            Cell(encoder[i], "down", widths[i], widths[i], widths[i + 1], make) for i in range(depth))
        self.decoder = nn.ModuleList(
            Cell(decoder[j], "up", widths[j + 1] * (1 if j == depth - 1 else 2), widths[j + 1], widths[j], make)
            for j in range(depth))
        self.head = nn.Conv3d(2 * widths[0], int(macro["out_channels"]), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[2:]) <= 2 ** self.depth:
            raise NasDoseError(f"input: spatial size {tuple(x.shape[2:])} is too small for depth {self.depth} "
                               f"(each axis needs more than {2 ** self.depth} voxels)")
        x = self.stem(x)
        skips = []
        for cell in self.encoder:
            skip, x = cell(x)
            skips.append(skip)
        for j in reversed(range(self.depth)):
            _, x = self.decoder[j](x, skips[j].shape[2:])
            x = torch.cat([x, skips[j]], dim=1)
        return self.head(x)
