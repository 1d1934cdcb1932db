"""`nasdose search … conditioning=film` (issue 18): conditioned supernets learn from the
preference plans, a genotype is scored on every plan of the architecture patients at that plan's
preferences, pool.yaml records the conditioning and `nasdose ensemble` trains conditioned members
from it (from the conditioned supernet's weights with init=inherit). Tiny: 16³ phantoms with 4
plans each, LENAS with one level of 8 channels, a few steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_search_cli import search  # also registers the strategy 'test_three'

from nas_dose import ensemble
from nas_dose.config import load_config
from nas_dose.data.dataset import build_item, plan_items, plan_reference
from nas_dose.data.preferences import NAMES
from nas_dose.data.store import open_data
from nas_dose.ensemble import EnsembleConfig, Inputs
from nas_dose.errors import NasDoseError
from nas_dose.inference import conditioned_on, load_ensemble, predict_patient
from nas_dose.io import load_checkpoint, load_json
from nas_dose.models.conditioning import Conditioned, Preset, condition, conditioning_spec
from nas_dose.pool import load_pool
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.search_spaces import Genotype, Supernet, build_model, count_params, get_space
from nas_dose.strategies import SearchContext, differentiable, evaluator
from nas_dose.strategies.evaluator import SUPERNET_FILE, inherited_weights
from nas_dose.training import dose_errors_gy

SPEC = conditioning_spec("film", NAMES)
SMALL = ("conditioning=film", "macro.stem=4", "macro.widths=[8]", "runtime.threads=1")
EVOLVE = (*SMALL, "pool_size=2", "strategy=evolution",
          "options={budget: 3, population: 2, sample: 1, evaluator: {supernet_steps: 4, lr: 0.01}}")
ENSEMBLE = ["train.epochs=1", "train.steps_per_epoch=2", "train.optim.lr=0.003", "train.data.augment.enabled=false",
            "runtime.device=cpu", "runtime.threads=1", "plots=0", "selection.max_size=2"]


OPTIMIZED: dict[str, list[int]] = {}  # module -> parameters (elements) each optimizer it made steps


def recording(module) -> object:
    """`module`'s make_optimizer, recording how many parameter elements each optimizer steps."""
    make = module.make_optimizer

    def record(params, cfg):
        params = list(params)
        OPTIMIZED.setdefault(module.__name__, []).append(sum(p.numel() for p in params))
        return make(params, cfg)
    return record


def supernet_weights(macro: dict) -> int:
    """The elements of every parameter of a conditioned LENAS supernet but its α."""
    space = get_space("lenas")
    supernet = Supernet(space, space.check_macro(macro))
    return count_params(condition(supernet, SPEC)) - sum(a.numel() for a in supernet.alphas)


@pytest.fixture(scope="module")
def evolved(plan_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cevolved") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluator, "make_optimizer", recording(evaluator))
        search(plan_data, out, *EVOLVE)
    return out


def conditioned_supernet(out: Path) -> tuple[Conditioned, Supernet]:
    """The search's trained conditioned supernet (its one entry: LENAS has op slots only)."""
    state = torch.load(out / SUPERNET_FILE, weights_only=True)
    [entry] = state["supernets"]
    space = get_space("lenas")
    supernet = Supernet(space, space.check_macro(state["macro"]), entry["fixed"])
    wrapped = condition(supernet, state["conditioning"])
    wrapped.load_state_dict(entry["model"])
    return wrapped.eval(), supernet


def plan_batches(data: Path, ids: list[str]):
    """(plan item, input, target, mask) of every plan of `ids`, as tensors of batch 1."""
    with open_data(data) as d:
        for item in plan_items(d, ids):
            arrays = build_item(plan_reference(d, item))
            yield item, *(torch.from_numpy(arrays[k])[None] for k in ("input", "target", "mask"))


def test_the_pool_records_the_conditioning_and_the_supernet_is_conditioned(evolved):
    pool = load_pool(evolved / "pool.yaml")
    assert pool.conditioning == "film" and pool.config["conditioning"] == "film"
    assert "conditioning: film" in (evolved / "pool.yaml").read_text()
    assert "every preference plan of each patient" in pool.predictions
    state = torch.load(evolved / SUPERNET_FILE, weights_only=True)
    assert state["conditioning"] == SPEC
    # the supernet trained once, its preference embedding and FiLM heads with its weights
    assert OPTIMIZED[evaluator.__name__] == [supernet_weights(state["macro"])]
    keys = state["supernets"][0]["model"].keys()
    assert any(k.startswith("embed.") for k in keys) and any(".film." in k for k in keys)
    assert load_json(evolved / "state" / "evaluator" / "settings.json")["conditioning"] == SPEC
    # a candidate costs what its conditioned network costs (the FiLM heads and the embedding too)
    g = pool.members[0].genotype
    assert pool.members[0].metrics["params"] == count_params(condition(build_model(g), SPEC)) > count_params(
        build_model(g))


def test_a_genotype_is_scored_on_every_plan_at_its_own_preferences(evolved, plan_data):
    """The search score: the mean over the architecture patients of the mean over their plans of
    the dose error of the supernet fixed to the genotype, asked for each plan's preferences."""
    arch = load_json(evolved / "state" / "evaluator" / "settings.json")["arch_ids"]
    wrapped, supernet = conditioned_supernet(evolved)
    member = load_pool(evolved / "pool.yaml").members[0]
    supernet.fix(member.genotype)
    errors: dict[str, list[float]] = {}
    changed = []
    with torch.no_grad():
        for item, x, target, mask in plan_batches(plan_data, arch):
            pred = wrapped(x, torch.tensor(item.values, dtype=torch.float32)[None])
            errors.setdefault(item.pid, []).append(float(dose_errors_gy(pred, target, mask)[0]))
            other = wrapped(x, torch.tensor([[1.0 - item.values[0], item.values[1]]], dtype=torch.float32))
            changed.append(float((pred - other).abs().max()))
    assert [len(e) for e in errors.values()] == [4] * len(arch)
    assert member.search_score == pytest.approx(np.mean([np.mean(e) for e in errors.values()]), rel=1e-4)
    assert min(changed) > 0  # the trained FiLM heads make the prediction depend on the preferences


@pytest.mark.parametrize("overrides, message", [
    (["strategy=differentiable", "diversity.mode=sequential"],
     "strategy 'differentiable' cannot search conditioned networks with diversity.mode=sequential"),
    (["strategy=test_three", "diversity.mode=none"], "strategy 'test_three' cannot search conditioned networks"),
    (["conditioning=adain"], "config key 'conditioning': expected one of film"),
    (["cascade.coarse=somewhere"], "config key 'conditioning': a cascade's full-resolution stage cannot be"),
])
def test_what_cannot_be_searched_conditioned_fails_before_any_work(plan_data, tmp_path, overrides, message):
    with pytest.raises(NasDoseError, match=message):
        search(plan_data, tmp_path / "x", *SMALL, *overrides)
    assert not (tmp_path / "x").exists()


def test_a_plain_search_refuses_a_conditioned_supernet(evolved, plan_data, tmp_path):
    plain = [o for o in EVOLVE if o != "conditioning=film"]
    with pytest.raises(NasDoseError, match=r"supernet.pt: supernets of another search: conditioning \{"):
        search(plan_data, tmp_path / "x", *plain[:-1], "options={budget: 3, evaluator: {supernet_steps: 4, "
               f"lr: 0.01, supernet: {evolved / SUPERNET_FILE}}}}}")


def test_a_conditioned_differentiable_search_runs(plan_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(differentiable, "make_optimizer", recording(differentiable))
    search(plan_data, out, *SMALL, "pool_size=2", "options.epochs=1", "options.steps_per_epoch=2",
           "options.candidates=3")
    # weights (the embedding and FiLM heads with them), then α
    assert OPTIMIZED[differentiable.__name__][0] == supernet_weights({"stem": 4, "widths": [8]})
    pool = load_pool(out / "pool.yaml")
    assert pool.conditioning == "film" and len(pool.members) == 2
    g = pool.members[0].genotype
    assert pool.members[0].metrics["params"] == count_params(condition(build_model(g), SPEC))


def test_an_interrupted_conditioned_search_resumes_to_the_same_pool(evolved, plan_data, tmp_path, monkeypatch):
    log = SearchContext.log

    def interrupt(self, record):
        log(self, record)
        if record.get("event") == "child" and record["child"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(SearchContext, "log", interrupt)
    with pytest.raises(KeyboardInterrupt):
        search(plan_data, tmp_path / "cut", *EVOLVE)
    monkeypatch.setattr(SearchContext, "log", log)
    assert not (tmp_path / "cut" / "pool.yaml").exists()
    search(plan_data, tmp_path / "cut", resume=True)
    whole, cut = (load_pool(run / "pool.yaml") for run in (evolved, tmp_path / "cut"))
    assert [(m.genotype, m.search_score) for m in cut.members] == [(m.genotype, m.search_score) for m in whole.members]
    assert cut.conditioning == "film"


def test_an_interrupted_conditioned_supernet_training_resumes_to_the_uninterrupted_weights(
        evolved, plan_data, tmp_path, kill_supernet_at):
    """Embedding and FiLM heads included: the partial checkpoint keeps the whole conditioned supernet."""
    disarm = kill_supernet_at(4, checkpoint_every=2)  # killed before step 4: 2 steps checkpointed
    with pytest.raises(KeyboardInterrupt):
        search(plan_data, tmp_path / "cut", *EVOLVE)
    [partial] = (tmp_path / "cut" / "state" / "evaluator").glob("supernet-*.partial.pt")
    assert any(k.startswith("embed.") for k in torch.load(partial, weights_only=True)["model"])
    disarm()
    search(plan_data, tmp_path / "cut", resume=True)
    [resumed], [whole] = ([s["model"] for s in torch.load(run / SUPERNET_FILE, weights_only=True)["supernets"]]
                          for run in (tmp_path / "cut", evolved))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    whole_pool, cut_pool = (load_pool(run / "pool.yaml") for run in (evolved, tmp_path / "cut"))
    assert [(m.genotype, m.search_score) for m in cut_pool.members] == [
        (m.genotype, m.search_score) for m in whole_pool.members]


def test_the_ensemble_of_a_conditioned_pool_is_conditioned_and_inherits_the_conditioned_supernet(
        evolved, plan_data, tmp_path, monkeypatch):
    started: list[dict[str, torch.Tensor]] = []
    train = ensemble.train_model
    monkeypatch.setattr(ensemble, "train_model", lambda model, *a, **k: started.append(
        {name: v.clone() for name, v in model.state_dict().items()}) or train(model, *a, **k))
    out = tmp_path / "ens"
    # neither conditioning nor train.data.plans given: both come from the pool
    ensemble.run(load_config(EnsembleConfig, overrides=[*ENSEMBLE, "init=inherit"]),
                 Inputs(evolved / "pool.yaml", plan_data), out)
    pool = load_pool(evolved / "pool.yaml")
    for m in pool.members:
        ckpt = load_checkpoint(out / "members" / m.name / "best.pt")
        assert ckpt["model_config"]["conditioning"] == SPEC and ckpt["config"]["data"]["plans"] is True
    # a member starts from its path of the conditioned supernet, embedding included, and so
    # computes what the supernet fixed to its genotype computes
    g: Genotype = pool.members[0].genotype
    inherited = inherited_weights(evolved / SUPERNET_FILE, g, SPEC)
    assert started[0].keys() == inherited.keys() and all(torch.equal(started[0][k], inherited[k]) for k in inherited)
    member = condition(build_model(g), SPEC)
    member.load_state_dict(inherited)
    wrapped, supernet = conditioned_supernet(evolved)
    supernet.fix(g)
    _, x, _, _ = next(plan_batches(plan_data, ["pt_1"]))
    prefs = torch.tensor([[0.2, 0.1]])
    with torch.no_grad():
        torch.testing.assert_close(member.eval()(x, prefs), wrapped(x, prefs))
    with pytest.raises(NasDoseError, match="supernets conditioned as .*; the network is conditioned as None"):
        inherited_weights(evolved / SUPERNET_FILE, g)
    # the ensemble predicts as a conditioned model: its dose moves with the preferences asked
    ens = load_ensemble(out / "ensemble.yaml")
    assert conditioned_on(ens) == ("oar", "hi")
    runtime = Runtime(RuntimeConfig(device="cpu"))
    with open_data(plan_data) as d:
        patient = d.read("pt_7")
    low, high = (predict_patient(Preset(ens, [oar, 0.15]), patient, runtime) for oar in (0.0, 1.0))
    assert np.abs(low - high).max() > 1e-3
