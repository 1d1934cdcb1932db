"""The LENAS space (version 1): one down-cell design shared by every encoder level and one
up-cell design shared by every decoder level, with the published candidate ops.

5 · 5 · 2 · 6 = 300 encoder cells × 5 · 5 · 2 · 5 = 250 decoder cells = 75,000 architectures.
Default macro as LENAS trained its networks (with nasdose's 10 input channels instead of 9).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch.nn as nn

from .cells import CellUNet, SlotFactory, cell_slots
from .space import SearchSpace, register_space

CELL_OPS = ["identity", "se_conv", "dil_conv", "dep_conv", "conv"]
CONNECT_OPS = ["identity", "none"]
DOWN_OPS = ["avg_pool", "max_pool", "down_se_conv", "down_dil_conv", "down_dep_conv", "down_conv"]
UP_OPS = ["up_se_conv", "up_dep_conv", "up_conv", "up_dil_conv", "up_interpolate"]
# as LENAS trained its networks, with nasdose's 10 input channels (LENAS had 9)
DEFAULT_MACRO = {"in_channels": 10, "out_channels": 1, "stem": 16, "widths": [32, 64, 128, 256]}


def cell_candidates(prefix: str, direction: str, cell_ops: list[str], sample_ops: list[str]) -> dict[str, list]:
    """Slots of one cell design: op1 and op2 from ``cell_ops``, connect, and the resampling op."""
    op1, op2, connect, resample = cell_slots(prefix, direction)
    return {op1: list(cell_ops), op2: list(cell_ops), connect: list(CONNECT_OPS), resample: list(sample_ops)}


@register_space("lenas")
class LenasSpace(SearchSpace):
    version = 1

    def slots(self) -> dict[str, list]:
        return {**cell_candidates("down", "down", CELL_OPS, DOWN_OPS),
                **cell_candidates("up", "up", CELL_OPS, UP_OPS)}

    def default_macro(self) -> dict[str, Any]:
        return copy.deepcopy(DEFAULT_MACRO)

    def small_macro(self) -> dict[str, Any]:
        """2 levels, 4 to 16 channels: inputs from 5 voxels per axis."""
        return {**self.default_macro(), "stem": 4, "widths": [8, 16]}

    def construct(self, choices: Mapping[str, Any], macro: Mapping[str, Any], make: SlotFactory) -> nn.Module:
        depth = len(macro["widths"])
        return CellUNet(macro, ["down"] * depth, ["up"] * depth, make)
