"""The objective-consistency term of a conditioned model's training (`train.consistency`): zero
for the plan asked for, positive otherwise with a gradient that moves the dose towards what the
preferences ask (the PTV70's HI, the spared OARs' mean doses), and refused where it cannot apply."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nas_dose.config import ConfigError, load_config
from nas_dose.data.dataset import CHANNELS, PlanDataset
from nas_dose.data.patient import OARS, TARGETS
from nas_dose.data.preferences import SPARED_OARS, homogeneity_index
from nas_dose.distill.distill import DistillConfig
from nas_dose.ensemble import EnsembleConfig
from nas_dose.models.factory import ModelConfig
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.training import ConsistencyConfig, Objective, TrainConfig
from nas_dose.training.losses import consistency_loss, homogeneity, masked_loss, structure_masks

# 16³ phantoms: a PTV70 of a few voxels, OARs of one to three
BOTH = ConsistencyConfig(weight=1.0, min_voxels=1)
HI_ONLY = ConsistencyConfig(weight=1.0, hi_weight=1.0, oar_weight=0.0, min_voxels=1)
OAR_ONLY = ConsistencyConfig(weight=1.0, hi_weight=0.0, oar_weight=1.0, min_voxels=1)


@pytest.fixture(scope="module")
def batch(plan_data) -> dict[str, torch.Tensor]:
    """Two preference plans of two patients, unaugmented, with the preferences they were made with."""
    plans = PlanDataset(plan_data, "train", every_plan=True, preferences=True)
    items = [plans[0], plans[5]]
    return {k: torch.stack([item[k] for item in items]) for k in ("input", "target", "mask", "preferences")}


def masks(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, ...) masks of the PTV70 and of the spared OARs outside the targets."""
    m = structure_masks(batch["input"])
    ptv70 = m[:, len(OARS) + TARGETS.index("PTV70")][:, None]
    outside = batch["input"][:, [CHANNELS.index("ptv")]] <= 0
    spared = m[:, [OARS.index(o) for o in SPARED_OARS]].amax(1, keepdim=True) * outside
    return ptv70 > 0, spared > 0


def test_the_hi_is_the_one_the_plans_preferences_were_measured_with(batch):
    ptv70, _ = masks(batch)
    hi = homogeneity(batch["target"][:, 0], ptv70[:, 0].float())  # every item at once
    assert hi.shape == (2,)
    for i in range(2):
        assert float(hi[i]) == pytest.approx(homogeneity_index(batch["target"][i, 0].numpy(), ptv70[i, 0].numpy()),
                                             abs=1e-6)
        assert float(hi[i]) == pytest.approx(float(batch["preferences"][i, 1]), abs=1e-5)


def test_the_term_is_zero_for_the_plan_asked_for(batch):
    for cfg in (BOTH, HI_ONLY, OAR_ONLY):
        term = consistency_loss(batch["target"], batch["target"], batch["input"], batch["preferences"], cfg)
        assert float(term) == pytest.approx(0.0, abs=1e-5)


def gradient(pred: torch.Tensor, batch: dict[str, torch.Tensor], cfg: ConsistencyConfig) -> tuple[float, torch.Tensor]:
    pred = pred.clone().requires_grad_(True)
    term = consistency_loss(pred, batch["target"], batch["input"], batch["preferences"], cfg)
    term.backward()
    return float(term.detach()), pred.grad


def test_hotter_spared_oars_are_pulled_down_and_colder_ones_up(batch):
    _, spared = masks(batch)
    for factor, sign in ((1.2, 1.0), (0.8, -1.0)):
        pred = torch.where(spared, batch["target"] * factor, batch["target"])
        term, grad = gradient(pred, batch, OAR_ONLY)
        assert term > 0.005
        dosed = spared & (batch["target"] > 0)  # (a dose clamped at 0 passes no gradient)
        assert dosed.sum() > 5 and torch.all(grad[dosed] * sign > 0)  # descent moves each mean back
        assert torch.all(grad[spared] * sign >= 0) and torch.all(grad[~spared] == 0)


def test_a_less_homogeneous_ptv70_is_pulled_together_and_a_flatter_one_apart(batch):
    ptv70, _ = masks(batch)
    for spread in (1.5, 0.5):  # the PTV70's doses spread about their mean: HI above / below the asked one
        pred = batch["target"].clone()
        for i in range(2):
            inside = ptv70[i]
            values = pred[i][inside]
            pred[i][inside] = values.mean() + spread * (values - values.mean())
        term, grad = gradient(pred, batch, HI_ONLY)
        assert term > 0.02
        for i in range(2):
            values, g = pred[i][ptv70[i]], grad[i][ptv70[i]]
            hottest, coldest = g[values >= values.quantile(0.98)], g[values <= values.quantile(0.02)]
            # descent lowers the hot end and raises the cold one when HI is too high, and the reverse
            assert hottest.sum() * (1 if spread > 1 else -1) > 0 and coldest.sum() * (1 if spread > 1 else -1) < 0
        assert torch.all(grad[~ptv70.expand_as(grad)] == 0)


def test_a_cold_prediction_gives_a_bounded_term(batch):
    """A fresh network predicts doses near zero, some negative: the HI's D50 would be ~0."""
    ptv70, _ = masks(batch)
    pred = torch.where(ptv70, torch.linspace(-0.5, 0.2, ptv70.numel()).reshape(ptv70.shape), batch["target"])
    term, grad = gradient(pred, batch, HI_ONLY)
    assert 0.1 < term < 2 and torch.isfinite(grad).all() and grad.abs().max() < 10


def test_the_objective_adds_the_weighted_term(batch):
    runtime = Runtime(RuntimeConfig(device="cpu"))
    pred = batch["target"] * 1.1
    plain, consistent = Objective(), Objective()
    cfg = ConsistencyConfig(weight=0.5, min_voxels=1)
    consistent.bind(nn.Identity(), runtime, TrainConfig(model=ModelConfig(conditioning="film"), consistency=cfg))
    plain.bind(nn.Identity(), runtime, TrainConfig())
    term = consistency_loss(pred * batch["mask"], batch["target"], batch["input"], batch["preferences"], cfg)
    assert float(term) > 0.01
    assert float(plain.loss(pred, batch)) == pytest.approx(float(masked_loss(pred, batch["target"], batch["mask"])))
    assert float(consistent.loss(pred, batch)) == pytest.approx(float(plain.loss(pred, batch)) + 0.5 * float(term))


@pytest.mark.parametrize("overrides, message", [
    (["consistency.weight=-1"], "'consistency.weight': must be >= 0"),
    (["consistency.weight=1", "consistency.hi_weight=0", "consistency.oar_weight=0"], "not both 0"),
    (["consistency.weight=1"], "for a conditioned model only"),
    (["consistency.min_voxels=0"], "'consistency.min_voxels'"),
])
def test_a_bad_consistency_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, overrides=overrides)


def test_the_objective_refuses_the_term_for_a_model_that_is_not_conditioned(batch):
    """Plans alone pass the config (an ensemble conditions its members by its own key); the
    objective, which sees the model's config, refuses an unconditioned one."""
    cfg = load_config(TrainConfig, overrides=["data.plans=true", "consistency.weight=0.1"])
    with pytest.raises(ConfigError, match="for a conditioned model only"):
        Objective().bind(nn.Identity(), Runtime(RuntimeConfig(device="cpu")), cfg)


def test_conditioned_ensemble_members_take_the_term():
    cfg = load_config(EnsembleConfig, overrides=["conditioning=film", "train.data.plans=true",
                                                 "train.consistency.weight=0.1"])
    assert cfg.train.consistency.weight == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="train.consistency.weight"):  # distillation has no such term
        load_config(DistillConfig, overrides=["train.data.plans=true", "train.consistency.weight=0.1"])


def test_a_conditioned_config_takes_the_term():
    cfg = load_config(TrainConfig, overrides=["model.conditioning=film", "data.plans=true", "consistency.weight=0.1"])
    assert cfg.consistency == ConsistencyConfig(weight=0.1) and np.isclose(TrainConfig().consistency.weight, 0)
