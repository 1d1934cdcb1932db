"""`nasdose ensemble` end to end on a tiny synthetic data set and a hand-written pool of three
small LENAS genotypes, a few training steps per member."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nas_dose import cli, ensemble
from nas_dose.config import load_config
from nas_dose.data.store import open_data, write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.data.tta import flip_tta
from nas_dose.ensemble import EnsembleConfig, Inputs
from nas_dose.errors import NasDoseError
from nas_dose.inference import Ensemble, load_ensemble, load_model_or_ensemble, predict_patients, trained_inputs
from nas_dose.io import load_checkpoint, load_json, load_yaml, save_yaml
from nas_dose.pool import MATRICES, DiversityConfig, Pool, PoolMember, save_pool
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.search_spaces import get_space
from nas_dose.strategies import SearchContext
from nas_dose.strategies.evaluator import SUPERNET_FILE, CandidateEvaluator, EvaluatorConfig, inherited_weights
from nas_dose.training import train_model

MACRO = {"stem": 4, "widths": [8, 8]}
GENOTYPES = {
    "a": {"down.op1": "conv", "down.op2": "identity", "down.connect": "identity", "down.down": "max_pool",
          "up.op1": "conv", "up.op2": "identity", "up.connect": "identity", "up.up": "up_interpolate"},
    "b": {"down.op1": "dep_conv", "down.op2": "identity", "down.connect": "none", "down.down": "avg_pool",
          "up.op1": "identity", "up.op2": "dep_conv", "up.connect": "identity", "up.up": "up_conv"},
    "c": {"down.op1": "identity", "down.op2": "se_conv", "down.connect": "identity", "down.down": "down_conv",
          "up.op1": "identity", "up.op2": "identity", "up.connect": "none", "up.up": "up_dep_conv"},
}
# 2 epochs of 2 steps (batch 2) per member, one thread each: a few seconds per member.
SETTINGS = ["train.epochs=2", "train.steps_per_epoch=2", "train.optim.lr=0.003", "train.log_every=1",
            "train.data.augment.enabled=false", "runtime.device=cpu", "runtime.threads=1", "plots=1",
            "selection.max_size=3"]


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory) -> Path:
    space = get_space("lenas")
    members = [PoolMember(name, space.genotype(choices, MACRO), 1.0 + i)
               for i, (name, choices) in enumerate(GENOTYPES.items())]
    n = len(members)
    path = tmp_path_factory.mktemp("pool") / "pool.yaml"
    save_pool(path, Pool("lenas", "hand", 0, members, {k: np.zeros((n, n)) for k in MATRICES}))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, data, pool_file) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ens") / "run"
    cfg = load_config(EnsembleConfig, overrides=[*SETTINGS, "selection.combination=weighted"])
    return out, ensemble.run(cfg, Inputs(pool_file, data), out)


@pytest.fixture
def nasdose():
    """The `nasdose` command line, called in-process."""
    return lambda *args: cli.main([str(a) for a in args])


def test_files_and_metrics(run, data):
    out, metrics = run
    for name in GENOTYPES:
        folder = out / "members" / name
        for f in ("genotype.yaml", "best.pt", "checkpoints/last.pt", "validation.h5", "config.yaml"):
            assert (folder / f).is_file(), f
        record = load_json(folder / "metrics.json")
        assert record["steps"] == 4 and record["validation"]["n_patients"] == 2
        assert record["validation"]["dose_score"] == pytest.approx(metrics["members"][name]["dose_score"])
    for f in ("ensemble.yaml", "validation.h5", "metrics.json", "config.yaml", "plots/size_curve.png",
              "plots/diversity.png"):
        assert (out / f).is_file(), f
    assert len(list((out / "plots").glob("dvh_*.png"))) == 1
    saved = load_json(out / "metrics.json")
    assert saved["patients"] == ["pt_7", "pt_8"]
    ins, loo = saved["validation_in_sample"], saved["validation_leave_one_patient_out"]
    assert set(ins["per_structure"]) and ins["dose_score"] > 0 and ins["dvh_score"] > 0
    assert set(loo["weights"]) == {"pt_7", "pt_8"} and loo["dose_score"] > 0
    # the size curve's kept entry is the in-sample score, which selection minimized over the curve
    curve = saved["size_curve"]
    assert len(curve) == 3 and curve[0]["added"] == saved["best_member"]["name"]
    assert min(c["dose_score"] for c in curve) == pytest.approx(ins["dose_score"], rel=1e-5)
    assert ins["dose_score"] <= saved["best_member"]["dose_score"] + 1e-6
    n = len(GENOTYPES)
    assert np.array(saved["diversity"]["validation"]["disagreement"]).shape == (n, n)
    assert np.all(np.diag(saved["diversity"]["validation"]["disagreement"]) == 0)
    assert load_yaml(out / "config.yaml")["selection"]["combination"] == "weighted"


def test_ensemble_yaml_loads_and_equals_the_weighted_mean_of_members(run, data):
    out, metrics = run
    spec = load_yaml(out / "ensemble.yaml")
    assert spec["format"] == "nasdose-ensemble" and spec["combination"] == "weighted"
    assert all(m["checkpoint"] == f"members/{m['name']}/best.pt" for m in spec["members"])
    weights = {m["name"]: m["weight"] for m in spec["members"]}
    assert weights == pytest.approx(metrics["ensemble"]["weights"]) and sum(weights.values()) == pytest.approx(1)
    ens = load_ensemble(out / "ensemble.yaml")
    assert isinstance(load_model_or_ensemble(out / "ensemble.yaml"), Ensemble)
    assert not isinstance(load_model_or_ensemble(out / "members" / "a"), Ensemble)
    x = torch.randn(1, 10, 16, 16, 16)
    with torch.no_grad():
        expected = sum(w * load_model_or_ensemble(out / "members" / n)(x).clamp_min(0) for n, w in weights.items())
        np.testing.assert_allclose(ens(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # predicting with the ensemble gives the validation predictions made from the members' cache
    runtime = Runtime(RuntimeConfig(device="cpu"))
    with open_data(data) as d, open_data(out / "validation.h5") as saved:
        for pid, dose in predict_patients(ens, d, d.ids("validation"), runtime):
            np.testing.assert_allclose(dose, saved.read_dose(pid), rtol=1e-4, atol=1e-4)


def test_ensemble_clamps_each_member_and_applies_predicts_tta_to_it():
    class Ramp(nn.Module):
        """Negative in part, depends on the position along axis 0 and on the right parotid channel."""

        def forward(self, x):
            return torch.linspace(-1, 2, x.shape[2]).view(1, 1, -1, 1, 1) + x[:, 4:5]

    x = torch.rand(1, 10, 6, 6, 6)
    clamped = lambda z: Ramp()(z).clamp_min(0)  # noqa: E731
    np.testing.assert_allclose(Ensemble([Ramp(), Ramp()], [0.25, 0.75])(x).numpy(), clamped(x).numpy(), rtol=1e-6)
    tta = Ensemble([Ramp()], [1.0], tta=True)(x)
    np.testing.assert_allclose(tta.numpy(), flip_tta(clamped, x).numpy(), rtol=1e-6)
    assert not torch.allclose(tta, clamped(x))
    assert not torch.allclose(tta, flip_tta(Ramp(), x).clamp_min(0))  # clamped before the flips are averaged


def mtimes(members: Path) -> dict[str, int]:
    """Modification times of members a's and b's checkpoints."""
    return {f"{n}/{f}": (members / n / f).stat().st_mtime_ns for n in ("a", "b")
            for f in ("best.pt", "checkpoints/last.pt")}


def test_resume_reuses_finished_members_and_continues_a_half_trained_one(tmp_path, data, pool_file, monkeypatch,
                                                                         capsys, nasdose):
    out = tmp_path / "run"
    members = out / "members"
    cfg = load_config(EnsembleConfig, overrides=SETTINGS)

    def interrupted(model, config, data, out, resume=False, objective=None):
        """Member c stops after step 3; its last checkpoint is the end of epoch 1 (step 2)."""
        def stop(step):
            if step == 3 and Path(out).name == "c":
                raise KeyboardInterrupt
        return train_model(model, config, data, out, resume, on_step=stop, objective=objective)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(ensemble, "train_model", interrupted)
        ensemble.run(cfg, Inputs(pool_file, data), out)
    assert load_checkpoint(members / "c" / "checkpoints" / "last.pt")["step"] == 2
    assert not (members / "c" / "metrics.json").exists() and not (out / "ensemble.yaml").exists()
    done = mtimes(members)
    with pytest.raises(NasDoseError, match="use --resume"):
        ensemble.run(cfg, Inputs(pool_file, data), out)
    capsys.readouterr()
    ensemble.run(cfg, Inputs(pool_file, data), out, resume=True)
    before_c, c = capsys.readouterr().out.split("member 3/3")
    assert "resuming" in c and "resuming" not in before_c  # a and b were not touched
    assert mtimes(members) == done
    assert len((members / "c" / "log.jsonl").read_text().splitlines()) == 4
    assert load_json(members / "c" / "metrics.json")["steps"] == 4
    assert (out / "ensemble.yaml").is_file()
    # another selection, with flip TTA: the members predict again, nothing is retrained
    assert nasdose("ensemble", pool_file, "--data", data, "--out", out, "--resume", "-q", *SETTINGS,
                   "selection.method=all", "tta=true") == 0
    summary = load_json(out / "metrics.json")["ensemble"]
    assert (summary["selection"], summary["tta"], sorted(summary["picks"])) == ("all", True, ["a", "b", "c"])
    assert summary["weights"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert all((members / n / "validation_tta.h5").is_file() for n in ("a", "b", "c"))
    assert len(load_yaml(out / "ensemble.yaml")["members"]) == 3
    assert mtimes(members) == done
    # a different member training cannot be resumed
    assert nasdose("ensemble", pool_file, "--data", data, "--out", out, "--resume", "-q", *SETTINGS,
                   "train.epochs=3") == 1
    assert "config.yaml" in capsys.readouterr().err


def test_members_trained_side_by_side_equal_those_trained_one_after_another(run, tmp_path, data, pool_file,
                                                                             capsys):
    """parallel=2: two processes of one thread each train the members as the single process did
    (same seeds, same steps), and the ensemble chosen from them is the same."""
    first, metrics = run
    out = tmp_path / "side"
    cfg = load_config(EnsembleConfig, overrides=[*SETTINGS, "selection.combination=weighted", "parallel=2"])
    again = ensemble.run(cfg, Inputs(pool_file, data), out)
    assert "2 at a time" in capsys.readouterr().out
    for name in GENOTYPES:
        a, b = (load_checkpoint(root / "members" / name / "best.pt")["model"] for root in (first, out))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    assert again["ensemble"]["picks"] == metrics["ensemble"]["picks"]
    assert again["ensemble"]["weights"] == pytest.approx(metrics["ensemble"]["weights"], abs=1e-5)


def test_bad_inputs_are_one_line_errors(tmp_path, data, pool_file, capsys, nasdose):
    bad = tmp_path / "pool.yaml"
    save_yaml(bad, {"format": "nasdose-pool", "version": 1, "space": "lenas", "members": []})
    assert nasdose("ensemble", bad, "--data", data, "--out", tmp_path / "o", "-q") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "members" in err
    assert not (tmp_path / "o").exists()
    assert nasdose("ensemble", pool_file, "--data", data, "--out", tmp_path / "o", "-q",
                   "train.model.name=x") == 1
    assert "train.model" in capsys.readouterr().err
    spec = tmp_path / "ens.yaml"
    save_yaml(spec, {"format": "nasdose-ensemble", "version": 1, "members": [
        {"name": "a", "genotype": "g.yaml", "checkpoint": "missing.pt", "weight": 1.0}]})
    with pytest.raises(NasDoseError, match="missing.pt"):
        load_ensemble(spec)
    save_yaml(spec, {"format": "nasdose-ensemble", "version": 1, "members": [{"name": "a", "weight": -1}]})
    with pytest.raises(NasDoseError, match=f"{spec}: member 0"):
        load_ensemble(spec)


def test_a_searched_ensemble_predicts_without_nni(run, data, tmp_path):
    """NNI is the search's vocabulary, not a need of a searched network: with `nni` unimportable,
    `nasdose predict` loads and runs the ensemble of searched genotypes."""
    import subprocess
    import sys

    out, _ = run
    code = ("import sys; sys.modules['nni'] = None; from nas_dose.cli import main; "
            f"sys.exit(main(['predict', '--model', {str(out / 'ensemble.yaml')!r}, '--data', {str(data)!r}, "
            f"'--out', {str(tmp_path / 'pred')!r}, '--split', 'validation', '-q', 'runtime.device=cpu']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "nni" not in done.stderr and (tmp_path / "pred" / "predictions.h5").exists()
    check = subprocess.run([sys.executable, "-c", "import sys; sys.modules['nni'] = None; import nni"],
                           capture_output=True, text=True)
    assert check.returncode != 0  # the blocking works


def test_init_inherit_starts_members_from_their_supernet_weights(tmp_path, data, pool_file, monkeypatch):
    space = get_space("lenas")
    g = space.genotype(GENOTYPES["a"], MACRO)
    folder = tmp_path / "search"
    ctx = SearchContext(space, space.check_macro(MACRO), data, Runtime(RuntimeConfig(device="cpu")), 0,
                        ["pt_1", "pt_2", "pt_3", "pt_4"], ["pt_5", "pt_6"], [], diversity=DiversityConfig(mode="none"),
                        state_dir=folder / "state", supernet_file=folder / SUPERNET_FILE)
    CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=2)).score(g)
    save_pool(folder / "pool.yaml", Pool("lenas", "hand", 0, [PoolMember("a", g, 1.0)],
                                         {k: np.zeros((1, 1)) for k in MATRICES}))
    started = []
    train = ensemble.train_model
    monkeypatch.setattr(ensemble, "train_model", lambda model, *a, **k: started.append(
        {name: v.clone() for name, v in model.state_dict().items()}) or train(model, *a, **k))
    cfg = load_config(EnsembleConfig, overrides=[*SETTINGS, "init=inherit"])
    ensemble.run(cfg, Inputs(folder / "pool.yaml", data), tmp_path / "inherit")
    inherited = inherited_weights(folder / SUPERNET_FILE, g)
    assert started[0].keys() == inherited.keys() and all(torch.equal(started[0][k], inherited[k]) for k in inherited)
    ensemble.run(replace(cfg, init="scratch"), Inputs(folder / "pool.yaml", data), tmp_path / "scratch")
    assert not all(torch.equal(started[1][k], inherited[k]) for k in inherited)
    with pytest.raises(NasDoseError, match=f"^{pool_file}: init=inherit: no trained supernet at "
                                           f"{pool_file.parent / SUPERNET_FILE}"):
        ensemble.run(cfg, Inputs(pool_file, data), tmp_path / "none")


def test_members_trained_without_a_channel_predict_the_data_set_that_has_it(tmp_path, pool_file):
    plates = tmp_path / "plates.h5"
    write_dataset(plates, synth_patients(8, 16, 0, beam_plates=True), source="test", grid=16)
    cfg = load_config(EnsembleConfig, overrides=[*SETTINGS, "train.data.hide=[beam_plate]"])
    ensemble.run(cfg, Inputs(pool_file, plates), tmp_path / "run")  # the pool was searched without plates
    assert trained_inputs(tmp_path / "run" / "ensemble.yaml") == ()
    assert cli.main(["predict", "--model", str(tmp_path / "run" / "ensemble.yaml"), "--data", str(plates),
                     "--out", str(tmp_path / "pred"), "-q"]) == 0
