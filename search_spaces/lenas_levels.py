"""``lenas_levels``: a richer LENAS space with its own cell design per level, plus width and depth.

Slots ``enc{i}.op1 … enc{i}.down`` and ``dec{i}.op1 … dec{i}.up`` for i = 0..3 (level 0 is
full resolution), op candidates from the extended registry (5×5×5 kernels, residual block,
``zero`` as op2), and two integer slots: ``width`` (percent of the macro's stem and widths)
and ``depth`` (how many of the macro's 4 widths are used). The supernet mixes the ops only;
width and depth come from ``fixed`` or the defaults (100 %, depth 4). The cells of the levels
beyond a genotype's depth are unused (`active_slots`): the space sets them to their first
candidate (`SearchSpace.canonical`), so genotypes of one network are one genotype, scored once.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch.nn as nn

from nas_dose.errors import NasDoseError

from .cells import CellUNet, SlotFactory
from .genotype import Genotype
from .lenas import CELL_OPS, DEFAULT_MACRO, DOWN_OPS, UP_OPS, cell_candidates
from .space import SearchSpace, register_space

LEVELS = 4
OP1 = CELL_OPS + ["conv_k5", "dep_conv_k5", "res_conv"]
OP2 = OP1 + ["zero"]
WIDTHS = [50, 75, 100]
DEPTHS = [2, 3, 4]


def _level(slot: str) -> int | None:
    """The level of an ``enc{i}.*`` / ``dec{i}.*`` slot; None for width and depth."""
    prefix = slot.split(".")[0]
    return int(prefix[3:]) if prefix[:3] in ("enc", "dec") else None


@register_space("lenas_levels")
class LenasLevelsSpace(SearchSpace):
    version = 1

    def slots(self) -> dict[str, list]:
        slots: dict[str, list] = {}
        for prefix, direction, resample in (("enc", "down", DOWN_OPS + ["down_conv_k5"]), ("dec", "up", UP_OPS)):
            for i in range(LEVELS):
                slots.update(cell_candidates(f"{prefix}{i}", direction, OP1, resample))
                slots[f"{prefix}{i}.op2"] = list(OP2)
        return {**slots, "width": list(WIDTHS), "depth": list(DEPTHS)}

    def default_macro(self) -> dict[str, Any]:
        return copy.deepcopy(DEFAULT_MACRO)

    def small_macro(self) -> dict[str, Any]:
        """4 levels (the depth slot needs them), 2 to 8 channels; fix depth 2 for 5-voxel inputs."""
        return {**self.default_macro(), "stem": 2, "widths": [4, 4, 8, 8]}

    def check_macro(self, macro: Mapping[str, Any], source: str = "") -> dict[str, Any]:
        out = super().check_macro(macro, source)
        if len(out["widths"]) != LEVELS:
            raise NasDoseError(f"{source or 'search space ' + repr(self.name)}: macro 'widths' must have "
                               f"{LEVELS} entries in this space (the depth slot picks how many are used)")
        return out

    def active_slots(self, g: Genotype) -> list[str]:
        depth = int(g.choices["depth"])
        return [s for s in self.slots() if (level := _level(s)) is None or level < depth]

    def construct(self, choices: Mapping[str, Any], macro: Mapping[str, Any], make: SlotFactory) -> nn.Module:
        depth, percent = int(choices["depth"]), int(choices["width"])

        def scale(c: int) -> int:
            return max(1, round(c * percent / 100))

        scaled = {**macro, "stem": scale(macro["stem"]), "widths": [scale(w) for w in macro["widths"][:depth]]}
        return CellUNet(scaled, [f"enc{i}" for i in range(depth)], [f"dec{i}" for i in range(depth)], make)
