"""Preference conditioning: FiLM in any network's normalization layers, stored in the model spec
and checkpoints, trained on preference plans; unconditioned models as they were."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nas_dose import cli
from nas_dose.config import ConfigError, load_config
from nas_dose.data.dataset import PlanDataset
from nas_dose.data.preferences import SparingScale, homogeneity_index, spared_mean_doses
from nas_dose.data.resample import downsample_patient
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.errors import NasDoseError
from nas_dose.inference import Ensemble, conditioned_on, predict_patient, with_preferences
from nas_dose.io import load_checkpoint, load_json, load_yaml
from nas_dose.models import create_model
from nas_dose.models.conditioning import Conditioned, FiLMNorm, condition, conditioning_spec, plain_names
from nas_dose.models.factory import ModelConfig, build_model, check_input_size, load_model, model_spec
from nas_dose.progress import set_quiet
from nas_dose.runtime import Runtime, RuntimeConfig, seed_everything
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


def test_a_patient_without_plans_is_one_plan_at_its_measured_preferences(data):
    train = PlanDataset(data, "train", preferences=True)
    with open_data(data) as d:
        scale = SparingScale(spared_mean_doses(d.read(pid).dose, d.read(pid).structures) for pid in d.ids("train"))
        for index, pid in enumerate(train.ids):
            p = d.read(pid)
            item = train[(index, 3)]
            np.testing.assert_array_equal(item["target"][0].numpy(), p.dose / np.float32(70))
            oar, hi = item["preferences"].numpy()
            assert hi == pytest.approx(homogeneity_index(p.dose, p.structures["PTV70"]), abs=1e-6)
            assert oar == pytest.approx(scale.sparing(spared_mean_doses(p.dose, p.structures)), abs=1e-6)
    oars = [v[0, 0] for v in train.values]
    assert 0 <= min(oars) < 0.45 and 0.55 < max(oars) <= 1  # around the typical plan (0.5), both ways


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


@pytest.fixture(scope="module")
def conditioned_run(plan_data, tmp_path_factory) -> Path:
    cfg = load_config(TrainConfig, overrides=[*SMALL, "epochs=2", "model.conditioning=film", "data.plans=true"])
    seed_everything(0)
    out = tmp_path_factory.mktemp("runs") / "conditioned"
    train_model(build_model(cfg.model), cfg, plan_data, out)
    return out


def nasdose_predict(capsys, *argv: object) -> tuple[int, str]:
    capsys.readouterr()
    status = cli.main(["predict", *map(str, argv), "-q", "runtime.device=cpu", "runtime.threads=1"])
    set_quiet(False)
    return status, capsys.readouterr().err


def test_predict_asks_a_conditioned_model_for_the_preferences(conditioned_run, plan_data, tmp_path, capsys):
    doses = {}
    for asked in ("oar=0.1,hi=0.1", "hi=0.1,oar=0.9"):
        out = tmp_path / asked
        assert nasdose_predict(capsys, "--model", conditioned_run, "--data", plan_data, "--out", out,
                               "--split", "validation", "--no-csv", "--preference", asked)[0] == 0
        with open_data(out / "predictions.h5") as preds:
            doses[asked] = preds.read_dose("pt_8")
        assert load_yaml(out / "config.yaml")["preferences"]["hi"] == 0.1
    assert not np.array_equal(*doses.values())
    model, _ = load_model(conditioned_run)
    with open_data(plan_data) as data:
        expected = predict_patient(model.at([0.9, 0.1]), data.read("pt_8"), Runtime(RuntimeConfig(device="cpu")))
    np.testing.assert_allclose(doses["hi=0.1,oar=0.9"], expected, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--preference", "oar=1.5,hi=0.1"], r"preference oar=1.5 is out of its range \[0, 1\]"),
    (["--preference", "oar=0.5,hi=0.1,ctv=1"], "unknown preference 'ctv'"),
    (["--preference", "oar=0.5"], "preference 'hi' not given"),
    ([], "is conditioned on preferences: give them"),
    (["--sweep", "oar=0,2", "--preference", "hi=0.1"], r"oar=2 is out of its range"),
])
def test_bad_preferences_are_one_line_errors(conditioned_run, plan_data, tmp_path, capsys, argv, message):
    status, err = nasdose_predict(capsys, "--model", conditioned_run, "--data", plan_data, "--out", tmp_path / "p",
                                  *argv)
    assert status == 1 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "p").exists()


def test_a_plain_model_takes_no_preferences(run_plain, plan_data, tmp_path, capsys):
    status, err = nasdose_predict(capsys, "--model", run_plain, "--data", plan_data, "--out", tmp_path / "p",
                                  "--preference", "oar=0.5,hi=0.1")
    assert status == 1 and "is not conditioned on preferences" in err


@pytest.fixture(scope="module")
def run_plain(plan_data, train_tiny, tmp_path_factory) -> Path:
    return train_tiny(plan_data, tmp_path_factory.mktemp("runs") / "plain")


def test_sweep_writes_a_dose_per_setting_and_the_dvh_overlays(conditioned_run, plan_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert nasdose_predict(capsys, "--model", conditioned_run, "--data", plan_data, "--out", out, "--split",
                           "validation", "--preference", "hi=0.1", "--sweep", "oar=0,0.5,1")[0] == 0
    files = sorted(p.name for p in out.glob("*.h5"))
    assert files == ["oar=0.5.h5", "oar=0.h5", "oar=1.h5"]
    assert sorted(p.name for p in (out / "dvh").iterdir()) == ["pt_7.png", "pt_8.png"]
    with open_data(out / "oar=0.h5") as low, open_data(out / "oar=1.h5") as high:
        assert low.ids() == ["pt_7", "pt_8"] and not np.array_equal(low.read_dose("pt_7"), high.read_dose("pt_7"))
    assert load_yaml(out / "config.yaml")["sweep"] == {"oar": [0.0, 0.5, 1.0]}


def test_an_ensemble_of_conditioned_members_is_conditioned(tmp_path):
    members = []
    for seed in (0, 1):
        seed_everything(seed)
        member = build_model(ModelConfig(kwargs={"widths": [4, 8]}, conditioning="film")).eval()
        _perturb_heads(member)
        members.append(member)
    ensemble = Ensemble(members, [0.25, 0.75]).eval()
    assert conditioned_on(ensemble) == ("oar", "hi") and conditioned_on(Ensemble([torch.nn.Identity()], [1])) == ()
    x, prefs = torch.randn(1, 10, 8, 8, 8), torch.tensor([[0.8, 0.2]])
    with torch.no_grad():
        expected = 0.25 * members[0](x, prefs).clamp_min(0) + 0.75 * members[1](x, prefs).clamp_min(0)
        torch.testing.assert_close(ensemble(x, prefs), expected)
        torch.testing.assert_close(with_preferences(tmp_path, ensemble, {"oar": 0.8, "hi": 0.2})(x), expected)
        flipped = Ensemble(members, [0.25, 0.75], tta=True).eval()
        assert flipped(x, prefs).shape == x[:, :1].shape
    with pytest.raises(NasDoseError, match="is conditioned on preferences: give them"):
        with_preferences(tmp_path, ensemble, None)


def nasdose(capsys, *argv: object) -> tuple[int, str, str]:
    """Run the CLI (one thread, on the CPU where the command takes a runtime); status, stdout, stderr."""
    capsys.readouterr()
    status = cli.main([*map(str, argv)])
    set_quiet(False)
    out = capsys.readouterr()
    return status, out.out, out.err


def test_train_scores_a_conditioned_model_at_each_patients_measured_preferences(resampled_data, tmp_path, capsys):
    run = tmp_path / "run"
    status, printed, _ = nasdose(capsys, "train", "--data", resampled_data, "--out", run, *SMALL, "epochs=2",
                                 "model.conditioning=film", "data.plans=true")
    assert status == 0
    official = load_json(run / "metrics.json")["official_val_scores"]
    assert official["grid"] == 32 and official["patients"] == 2 and official["preferences"] == "measured"
    assert (f"official validation scores (OpenKBP, 32³ source grid, 2 patients, each at its own measured "
            f"preferences): dose {official['dose_score']:.3f} Gy, DVH {official['dvh_score']:.3f} Gy") in printed
    # `predict --preference measured` + `evaluate` repeat them exactly (the CSVs up to their rounding)
    pred = tmp_path / "pred"
    assert nasdose(capsys, "predict", "-q", "--model", run, "--data", resampled_data, "--out", pred, "--split",
                   "validation", "--preference", "measured", "runtime.device=cpu", "runtime.threads=1")[0] == 0
    assert load_yaml(pred / "config.yaml")["preferences"] == "measured"
    for predicted, tolerance in ((pred / "predictions.h5", 0), (pred / "submission", 1e-4)):
        assert nasdose(capsys, "evaluate", "-q", "--pred", predicted, "--ref", resampled_data, "--out",
                       tmp_path / predicted.name, "--split", "validation", "--plots", 0)[0] == 0
        scores = load_json(tmp_path / predicted.name / "metrics.json")
        assert scores["n_patients"] == 2
        assert scores["dose_score"] == pytest.approx(official["dose_score"], abs=tolerance)
        assert scores["dvh_score"] == pytest.approx(official["dvh_score"], abs=tolerance)
    # each patient at the preferences its own dose measures against the training plans
    model, _ = load_model(run)
    runtime = Runtime(RuntimeConfig(device="cpu"))
    with open_data(resampled_data) as d, open_data(pred / "predictions.h5") as preds:
        scale = SparingScale(spared_mean_doses(d.read(pid).dose, d.read(pid).structures) for pid in d.ids("train"))
        asked = []
        for pid in d.ids("validation"):
            p = d.read(pid)
            values = [scale.sparing(spared_mean_doses(p.dose, p.structures)),
                      homogeneity_index(p.dose, p.structures["PTV70"])]
            np.testing.assert_allclose(preds.read_dose(pid), predict_patient(model.at(values), p, runtime), atol=1e-5)
            asked.append(values)
    assert asked[0] != asked[1]


def test_measured_preferences_need_one_measured_plan_per_patient(conditioned_run, plan_data, unlabeled_data,
                                                                 tmp_path, capsys):
    for data, split, message in ((plan_data, "validation", r"patient pt_7 holds preference plans .*: ask for a "
                                                          r"setting \(--preference oar=V,hi=V\)"),
                                 (unlabeled_data, "unlabeled", "patient pt_9 has no dose to measure its "
                                                               "preferences on")):
        status, err = nasdose_predict(capsys, "--model", conditioned_run, "--data", data, "--out", tmp_path / "p",
                                      "--split", split, "--preference", "measured")
        assert status == 1 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
        assert not (tmp_path / "p").exists()
    status, err = nasdose_predict(capsys, "--model", conditioned_run, "--data", plan_data, "--out", tmp_path / "p",
                                  "--preference", "measured", "--sweep", "oar=0,1")
    assert status == 1 and "a sweep holds the other preferences at values, not 'measured'" in err


def test_a_plain_model_is_not_asked_for_measured_preferences(run_plain, data, tmp_path, capsys):
    status, err = nasdose_predict(capsys, "--model", run_plain, "--data", data, "--out", tmp_path / "p",
                                  "--preference", "measured")
    assert status == 1 and "is not conditioned on preferences" in err


def test_preference_plans_on_a_resampled_data_set_get_no_official_scores(tmp_path, capsys):
    """Their plans are on the data set's grid only: the validation score is the one that scores them."""
    plans = {p.id: p.plans for p in synth_patients(8, 16, seed=0, preferences=2)}
    coarse = (replace(downsample_patient(p, 2), plans=plans[p.id]) for p in synth_patients(8, 32, seed=0))
    write_dataset(tmp_path / "plans16.h5", coarse, source="synth32", grid=16)
    status, printed, _ = nasdose(capsys, "train", "--data", tmp_path / "plans16.h5", "--out", tmp_path / "run",
                                 *SMALL, "epochs=1", "model.conditioning=film", "data.plans=true")
    assert status == 0 and "official_val_scores" not in load_json(tmp_path / "run" / "metrics.json")
    assert "official scores: not computed (the validation patients' preference plans are on the data set's grid" \
        in printed


def test_plain_names_map_a_conditioned_network_onto_its_plain_twin():
    """Every state entry but the FiLM heads, by its unconditioned name: a plain network's weights
    load into the conditioned one through it, and the two then compute the same (heads at zero)."""
    torch.manual_seed(0)
    plain = create_model("unet3d", widths=(4, 8))
    torch.manual_seed(1)
    conditioned = condition(create_model("unet3d", widths=(4, 8)), conditioning_spec("film", ["oar", "hi"]))
    names = plain_names(conditioned.net)
    assert sorted(names.values()) == sorted(plain.state_dict())
    assert all(".film." not in k for k in names) and any(".norm." in k for k in names)
    conditioned.net.load_state_dict({k: plain.state_dict()[v] for k, v in names.items()}, strict=False)
    x = torch.rand(1, 10, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(conditioned.eval()(x, torch.tensor([[0.2, 0.1]])), plain.eval()(x))
