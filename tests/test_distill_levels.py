"""Multi-level feature hints: weighted hint terms by hand, and the levels a unet3d
student shares with teachers of other widths, depths and architectures, one adapter each."""
from pathlib import Path

import pytest
import torch
from torch import nn

from nas_dose.config import ConfigError, from_dict
from nas_dose.distill.levels import LEVELS, level_modules, level_pairs
from nas_dose.distill.losses import DistillObjective, HintConfig, hint_loss
from nas_dose.errors import NasDoseError
from nas_dose.models.factory import ModelConfig, build_model
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.search_spaces import build_model as build_genotype
from nas_dose.search_spaces import get_space
from nas_dose.training import TrainConfig

CPU = Runtime(RuntimeConfig(device="cpu"))
CHOICES = {"down.op1": "conv", "down.op2": "identity", "down.connect": "identity", "down.down": "max_pool",
           "up.op1": "conv", "up.op2": "identity", "up.connect": "identity", "up.up": "up_interpolate"}


def unet(*widths: int) -> nn.Module:
    return build_model(ModelConfig(name="unet3d", kwargs={"widths": list(widths)}))


def genotype_net(stem: int, widths: list[int]) -> nn.Module:
    return build_genotype(get_space("lenas").genotype(CHOICES, {"stem": stem, "widths": widths}))


def hinted(hint: HintConfig, student: nn.Module, teacher: nn.Module, grid: int = 16) -> DistillObjective:
    objective = DistillObjective(Path("unused.h5"), alpha_gt=1.0, alpha_teacher=0.0, hint=hint, hint_teacher=teacher)
    objective.grid = grid
    objective.bind(student, CPU, TrainConfig())
    return objective


def test_weighted_hint_loss_by_hand():
    s = torch.zeros(1, 1, 1, 1, 2)
    t1, t2 = torch.ones(1, 1, 1, 1, 2), torch.full((1, 1, 1, 1, 2), 2.0)
    identity = nn.Identity()
    # errors 1 and 4: equal weights average them, weights 3 and 1 give (3·1 + 1·4) / 4
    assert hint_loss([s, s], [t1, t2], [identity, identity]).item() == pytest.approx(2.5)
    assert hint_loss([s, s], [t1, t2], [identity, identity], [3.0, 1.0]).item() == pytest.approx(7 / 4)


def test_level_modules_of_both_unet_kinds():
    assert level_modules(unet(6, 12, 24)).encoder == ["downs.0", "downs.1", "ups.1"]
    assert level_modules(unet(6, 12, 24)).decoder == ["decoders.0", "decoders.1"]
    net = genotype_net(4, [8, 16])
    assert level_modules(net).encoder == ["encoder.0.resample", "encoder.1.resample", "decoder.1"]
    assert level_modules(net).decoder == ["head", "decoder.0"]
    with pytest.raises(NasDoseError, match="hint.levels: Conv3d"):
        level_modules(nn.Conv3d(10, 1, 1))


@pytest.mark.parametrize("teacher, channels", [
    # a deeper, wider unet3d: the student's bottom (8) meets the teacher's encoder level 1 (12)
    (lambda: unet(6, 12, 24), [(4, 6), (8, 12), (8, 12)]),
    # a genotype network (stem 6, widths 12, 24): encoder bodies 6, 12; decoder merge 2·6 at level 0
    (lambda: genotype_net(6, [12, 24]), [(4, 6), (8, 12), (8, 12)]),
])
def test_encoder_decoder_levels_get_one_adapter_each_with_the_right_channels(teacher, channels):
    torch.manual_seed(0)
    student = unet(4, 8)
    hint = from_dict(HintConfig, {"weight": 1.0, "levels": "encoder_decoder", "level_weights": [1.0, 0.5]})
    t = teacher()
    objective = hinted(hint, student, t)
    assert [(a.in_channels, a.out_channels) for a in objective.adapters] == channels
    assert objective.hint_weights == [1.0, 0.5, 1.0]  # encoder levels 0 and 1, decoder level 0
    x = torch.rand(1, 10, 16, 16, 16)
    pred = student(x)
    batch = {"input": x, "target": pred.detach(), "teacher": pred.detach(), "mask": torch.ones(1, 1, 16, 16, 16)}
    loss = objective.loss(pred, batch)
    loss.backward()
    assert loss.item() > 0 and all(a.weight.grad is not None for a in objective.adapters)


def test_level_presets_and_weights():
    s, t = unet(4, 8, 16), genotype_net(2, [4])  # student depth 2, teacher depth 1: levels 0 and 1 shared
    assert level_pairs(s, t, "encoder", []) == [("downs.0", "encoder.0.resample", 1.0), ("downs.1", "decoder.0", 1.0)]
    assert level_pairs(s, t, "decoder", [0.5, 2.0]) == [("decoders.0", "head", 0.5)]
    with pytest.raises(ConfigError, match="not both"):
        from_dict(HintConfig, {"levels": "encoder", "layers": [["head", "head"], ["x", "y"]]})
    with pytest.raises(ConfigError, match="level_weights"):
        from_dict(HintConfig, {"level_weights": [1.0]})
    with pytest.raises(ConfigError, match="every hint weighs 0"):
        HintConfig(weight=1.0, layers=[("head", "head", 0.0)]).pairs(s, t)


def test_a_network_without_a_level_below_full_resolution_is_one_config_error():
    # a CellUNet of depth 0 (a plug-in space could build one): its only level is full resolution
    from nas_dose.search_spaces.cells import CellUNet

    flat = CellUNet({"in_channels": 10, "out_channels": 1, "stem": 4, "widths": []}, [], [], lambda *a: None)
    for levels in LEVELS:
        with pytest.raises(ConfigError, match=r"^config key 'hint.levels': the teacher \(CellUNet\) has one "
                                              r"resolution level \(0, full resolution only\)") as e:
            hinted(from_dict(HintConfig, {"weight": 1.0, "levels": levels}), unet(4, 8), flat)
        assert "\n" not in str(e.value)


def test_level_weights_that_zero_every_paired_level_name_the_levels_paired():
    # a one-level U-Net (levels 0-1) has decoder level 0 only: weighing level 1 alone weighs nothing
    hint = from_dict(HintConfig, {"weight": 1.0, "levels": "decoder", "level_weights": [0.0, 1.0]})
    with pytest.raises(ConfigError, match=r"^config key 'hint.level_weights': every level hint.levels=decoder "
                                          r"pairs weighs 0 \(student levels 0-1, teacher 0-2; paired: encoder "
                                          r"\[\], decoder \[0\]\)$"):
        hinted(hint, unet(4, 8), unet(6, 12, 24))
