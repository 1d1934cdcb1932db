"""Which modules carry each resolution level's features of a U-Net: multi-level hints
(`hint.levels`, CMEDL-style) pair them between a student and a teacher of other widths, depths
and architectures.

Both U-Net kinds are covered, also inside a wrapper (a conditioned network's `net`): the
registered unet3d (`UNet`, L widths: deepest level d = L - 1) and a searched genotype's
`CellUNet` (depth D: d = D). A hint names its features, as every hint does, by the module whose
input they are:

  level k (0: full resolution)        UNet                CellUNet
  encoder features, k < d             downs.k             encoder.k.resample
  the bottom, k = d                   ups.(d-1)           decoder.(D-1)
  decoder features (skip ⊕ up), k < d decoders.k          decoder.(k-1) for k > 0, head for k = 0

Levels are paired by resolution: the first n = min(d_student, d_teacher) + 1 levels, the
shallower network's bottom meeting the deeper one's encoder at the same level. `encoder` pairs
levels 0..n-1 on the encoder side (the shallower bottom included), `decoder` levels 0..n-2 on the
decoder side, `encoder_decoder` both (2n - 1 pairs). Channels differ freely (the 1×1×1 adapters
map them); a spatial size that still differs (U-Net padding) is resized by `hint_loss`. A network
with no level below full resolution (d = 0), or level weights that zero every paired level, is one
config error naming the key and the levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from nas_dose.config import ConfigError
from nas_dose.errors import NasDoseError
from nas_dose.models.unet3d import UNet
from nas_dose.search_spaces.cells import CellUNet

Levels = Literal["encoder", "decoder", "encoder_decoder"]
LEVELS: tuple[str, ...] = ("encoder", "decoder", "encoder_decoder")


@dataclass(frozen=True)
class LevelModules:
    """One network's feature modules by level: `encoder[k]` for k = 0..d (the bottom last) and
    `decoder[k]` for k = 0..d-1."""

    encoder: list[str]
    decoder: list[str]

    @property
    def deepest(self) -> int:
        return len(self.encoder) - 1


def level_modules(model: nn.Module) -> LevelModules:
    """The feature modules of `model`'s U-Net (see the module docstring), full names."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, UNet) and module.dims == 3:
            d = len(module.encoders) - 1
            return LevelModules([f"{prefix}downs.{k}" for k in range(d)] + [f"{prefix}ups.{d - 1}"],
                                [f"{prefix}decoders.{k}" for k in range(d)])
        if isinstance(module, CellUNet):
            d = module.depth
            return LevelModules([f"{prefix}encoder.{k}.resample" for k in range(d)] + [f"{prefix}decoder.{d - 1}"],
                                [f"{prefix}head"] + [f"{prefix}decoder.{k - 1}" for k in range(1, d)])
    raise NasDoseError(f"hint.levels: {type(model).__name__} is neither a 3-D U-Net (unet3d) nor a genotype "
                       "network; name its modules in hint.layers instead")


def level_pairs(student: nn.Module, teacher: nn.Module, levels: Levels,
                weights: list[float]) -> list[tuple[str, str, float]]:
    """(student module, teacher module, weight) of each paired level, encoder side first, full
    resolution first; level k weighs `weights[k]` (the last entry for deeper levels; 1 without any)."""
    if levels not in LEVELS:
        raise NasDoseError(f"hint.levels: expected one of {', '.join(LEVELS)}, got {levels!r}")
    s, t = level_modules(student), level_modules(teacher)
    for role, net, modules in (("student", student, s), ("teacher", teacher, t)):
        if modules.deepest < 1:  # its bottom would be the full-resolution level: nothing to pair
            raise ConfigError(f"config key 'hint.levels': the {role} ({type(net).__name__}) has one resolution "
                              "level (0, full resolution only); level hints pair U-Nets of at least two (levels "
                              "0-1): name its modules in hint.layers instead")
    shared = min(s.deepest, t.deepest) + 1

    def weight(k: int) -> float:
        return weights[min(k, len(weights) - 1)] if weights else 1.0

    encoder = list(range(shared)) if levels != "decoder" else []
    decoder = list(range(shared - 1)) if levels != "encoder" else []
    pairs = ([(s.encoder[k], t.encoder[k], weight(k)) for k in encoder]
             + [(s.decoder[k], t.decoder[k], weight(k)) for k in decoder])
    if not sum(w for *_, w in pairs) > 0:
        raise ConfigError(f"config key 'hint.level_weights': every level hint.levels={levels} pairs weighs 0 "
                          f"(student levels 0-{s.deepest}, teacher 0-{t.deepest}; paired: encoder {encoder}, "
                          f"decoder {decoder})")
    return pairs
