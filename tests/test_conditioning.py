"""Preference conditioning: FiLM in any network's normalization layers, stored in the model spec
and checkpoints, trained on preference plans; unconditioned models as they were."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nas_dose.config import ConfigError, load_config
from nas_dose.data.dataset import PlanDataset
from nas_dose.errors import NasDoseError
from nas_dose.io import load_checkpoint
from nas_dose.models.conditioning import Conditioned, FiLMNorm, condition, conditioning_spec
from nas_dose.models.factory import ModelConfig, build_model, check_input_size, load_model, model_spec
from nas_dose.runtime import seed_everything
from nas_dose.search_spaces import build_model as build_genotype
from nas_dose.search_spaces import get_space
from nas_dose.training import TrainConfig, train_model

SMALL = ["model.kwargs.widths=[4, 8, 16]", "runtime.device=cpu", "runtime.threads=1", "optim.lr=0.003",
         "data.augment.enabled=false"]
SPEC = conditioning_spec("film", ("oar", "hi"))


def _perturb_heads(model: Conditioned) -> None:
    """Trained heads are not zero: give them values so the preferences matter."""
    torch.manual_seed(3)
    for m in model.modules():
        if isinstance(m, FiLMNorm):
            torch.nn.init.normal_(m.film.weight, std=0.3)


def test_a_fresh_conditioned_network_computes_the_plain_one():
    seed_everything(0)
    plain = build_model(ModelConfig(kwargs={"widths": [4, 8]}))
    seed_everything(0)
    conditioned = build_model(ModelConfig(kwargs={"widths": [4, 8]}, conditioning="film"))
    assert isinstance(conditioned, Conditioned)
    x = torch.randn(2, 10, 8, 8, 8)
    prefs = torch.tensor([[0.1, 0.05], [0.9, 0.3]])
    # The FiLM heads start at zero: the same function as the network without them.
    torch.testing.assert_close(conditioned(x, prefs), plain(x), rtol=0, atol=0)
    norms = sum(isinstance(m, torch.nn.InstanceNorm3d) for m in plain.modules())
    assert sum(isinstance(m, FiLMNorm) for m in conditioned.modules()) == norms == 6


def test_the_preferences_steer_each_sample_alone():
    seed_everything(0)
    model = build_model(ModelConfig(kwargs={"widths": [4, 8]}, conditioning="film")).eval()
    _perturb_heads(model)
    x = torch.randn(1, 10, 8, 8, 8).expand(2, -1, -1, -1, -1)
    both = model(x, torch.tensor([[0.1, 0.05], [0.9, 0.3]]))
    assert (both[0] - both[1]).abs().max() > 1e-3
    torch.testing.assert_close(model.at([0.9, 0.3])(x[:1]), both[1:], rtol=1e-4, atol=1e-5)
    with pytest.raises(NasDoseError, match=r"preferences of shape \(2, 2\)"):
        model(x, torch.zeros(2, 3))


def test_a_genotype_network_is_conditioned_in_every_norm():
    space = get_space("lenas")
    genotype = space.sample(np.random.RandomState(0), macro=space.small_macro())
    torch.manual_seed(0)
    plain = build_genotype(genotype)
    torch.manual_seed(0)
    model = condition(build_genotype(genotype), SPEC).eval()
    plain.eval()
    norms = sum(isinstance(m, torch.nn.InstanceNorm3d) for m in plain.modules())
    assert norms > 10 and sum(isinstance(m, FiLMNorm) for m in model.modules()) == norms
    x = torch.randn(1, 10, 16, 16, 16)
    torch.testing.assert_close(model(x, torch.tensor([[0.5, 0.1]])), plain(x), rtol=0, atol=0)
    _perturb_heads(model)
    assert (model(x, torch.tensor([[0.0, 0.1]])) - model(x, torch.tensor([[1.0, 0.1]]))).abs().max() > 1e-3
    check_input_size(model, 16)


def test_the_spec_names_the_conditioning_only_when_there_is_one():
    assert "conditioning" not in model_spec(ModelConfig())  # unconditioned checkpoints unchanged
    assert model_spec(ModelConfig(conditioning="film"))["conditioning"] == {
        "kind": "film", "names": ["oar", "hi"], "ranges": [[0.0, 1.0], [0.0, 1.0]], "hidden": 32}
    with pytest.raises(ConfigError, match="model.conditioning"):
        load_config(TrainConfig, overrides=["model.conditioning=adain", "data.plans=true"])
    with pytest.raises(ConfigError, match="set data.plans=true"):
        load_config(TrainConfig, overrides=["model.conditioning=film"])


def test_plan_items_carry_their_plans_preferences(plan_data, data):
    train = PlanDataset(plan_data, "train", seed=1, preferences=True)
    assert len(train) == 6
    item = train[(0, 0)]
    values = train.values[0]
    k = [i for i, v in enumerate(values) if np.allclose(v, item["preferences"].numpy())]
    assert len(k) == 1 and item["target"].shape == (1, 16, 16, 16)
    np.testing.assert_allclose(item["target"][0].numpy(), train.data.read_plan(item["id"], k[0]) / 70, rtol=1e-6)
    drawn = {int(np.argmin(np.abs(values - train[(0, e)]["preferences"].numpy()).sum(1))) for e in range(12)}
    assert len(drawn) > 2  # a plan drawn per epoch
    every = PlanDataset(plan_data, "validation", every_plan=True)
    assert len(every) == 8 and "preferences" not in every[0]
    with pytest.raises(NasDoseError, match="pt_1 has no preference plans"):
        PlanDataset(data, "train")


def test_a_conditioned_model_trains_reloads_and_predicts(plan_data, tmp_path):
    cfg = load_config(TrainConfig, overrides=[*SMALL, "epochs=2", "model.conditioning=film", "data.plans=true"])
    seed_everything(0)
    model = build_model(cfg.model)
    result = train_model(model, cfg, plan_data, tmp_path / "run")
    assert result.epochs == 2 and np.isfinite(result.best_val_score)
    assert load_checkpoint(tmp_path / "run" / "best.pt")["model_config"]["conditioning"]["names"] == ["oar", "hi"]
    loaded, _ = load_model(tmp_path / "run")
    assert isinstance(loaded, Conditioned)
    x = torch.randn(1, 10, 16, 16, 16)
    prefs = torch.tensor([[0.3, 0.2]])
    model.load_state_dict(result.best_state)
    torch.testing.assert_close(loaded(x, prefs), model.eval()(x, prefs), rtol=0, atol=0)
