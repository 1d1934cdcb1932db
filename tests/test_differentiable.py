import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nas_dose.config import ConfigError
from nas_dose.errors import NasDoseError
from nas_dose.pool import DiversityConfig
from nas_dose.progress import set_quiet
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.search_spaces import SearchSpace, get_space, register_space
from nas_dose.strategies import SearchContext, get_strategy
from nas_dose.strategies.differentiable import DifferentiableSearch, most_probable, tau_at


@register_space("test_rigged")
class RiggedSpace(SearchSpace):
    """One slot before a 1×1×1 head: 'identity' passes the inputs, from which the head can fit
    the dose; 'zero' leaves the head only its bias. Only one candidate can fit the target."""

    def slots(self):
        return {"path": ["zero", "identity"]}

    def default_macro(self):
        return {"in_channels": 10, "out_channels": 1}

    def construct(self, choices, macro, make):
        return nn.Sequential(make("path", "cell", 10, 10), nn.Conv3d(10, 1, 1))


@pytest.fixture(scope="module")
def data(search_data) -> Path:
    set_quiet(True)
    return search_data


def make_ctx(data: Path, out: Path | None = None, **kw) -> SearchContext:
    space = get_space("test_rigged")
    args = dict(weight_ids=["pt_1", "pt_2", "pt_3"], arch_ids=["pt_4", "pt_5", "pt_6", "pt_7"],
                diversity_ids=["pt_8", "pt_9"])
    args.update(kw)
    return SearchContext(space, space.default_macro(), data, Runtime(RuntimeConfig(device="cpu")), 0,
                         state_dir=None if out is None else out / "state",
                         log_path=None if out is None else out / "log.jsonl", **args)


OPTIONS = {"epochs": 3, "steps_per_epoch": 4, "arch_optim": {"lr": 0.05}, "weight_optim": {"lr": 0.01},
           "candidates": 2}


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_alpha_moves_to_the_op_that_can_fit(data, tmp_path):
    strategy = get_strategy("differentiable").from_options(OPTIONS)
    cands = strategy.run(make_ctx(data, tmp_path))
    p_identity = [h["path"][1] for h in strategy.history]
    assert p_identity[0] == pytest.approx(0.5)  # uniform at the start
    assert all(b > a for a, b in zip(p_identity, p_identity[1:])), p_identity
    assert p_identity[-1] > 0.6
    assert [c.genotype.choices["path"] for c in cands] == ["identity", "zero"]
    assert cands[0].metrics["alpha_rank"] == 0 and cands[0].score < cands[1].score
    assert cands[0].metrics["log_prob"] == pytest.approx(math.log(p_identity[-1]), rel=1e-5)
    # predictions on the diversity patients, as nasdose predict writes them (no negative dose)
    assert set(cands[0].predictions) == {"pt_8", "pt_9"}
    assert all(p.shape == (16, 16, 16) and p.min() >= 0 and p.max() > 0 for p in cands[0].predictions.values())
    epochs = [r for r in read_log(tmp_path / "log.jsonl") if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[-1]["genotype"]["choices"] == {"path": "identity"} and epochs[-1]["score"] > 0


def test_batches_come_from_disjoint_sets_and_arch_batches_change(data, tmp_path):
    get_strategy("differentiable").from_options({**OPTIONS, "epochs": 2}).run(make_ctx(data, tmp_path))
    epochs = [r for r in read_log(tmp_path / "log.jsonl") if r["event"] == "epoch"]
    arch = [b[0] for r in epochs for b in r["arch_batches"]]
    weight = [b[0] for r in epochs for b in r["weight_batches"]]
    assert set(arch) == {"pt_4", "pt_5", "pt_6", "pt_7"} and set(weight) == {"pt_1", "pt_2", "pt_3"}
    # a fresh batch every step: each epoch's 4 arch steps see all 4 patients, in a new order
    assert all(sorted(b[0] for b in r["arch_batches"]) == ["pt_4", "pt_5", "pt_6", "pt_7"] for r in epochs)
    assert epochs[0]["arch_batches"] != epochs[1]["arch_batches"]
    with pytest.raises(NasDoseError, match="overlap"):
        make_ctx(data, weight_ids=["pt_1", "pt_4"])


def test_warmup_leaves_alpha_alone_and_derive_by_score(data):
    strategy = get_strategy("differentiable").from_options(
        {**OPTIONS, "epochs": 2, "warmup_epochs": 1, "derive": "score"})
    cands = strategy.run(make_ctx(data))
    assert strategy.history[1] == strategy.history[0] and strategy.history[2] != strategy.history[1]
    assert cands[0].score <= cands[1].score  # best inherited score first, whatever α prefers


def test_resume_continues_exactly(data, tmp_path):
    whole = get_strategy("differentiable").from_options(OPTIONS)
    expected = whole.run(make_ctx(data, tmp_path / "a"))

    ctx = make_ctx(data, tmp_path / "b")
    log = ctx.log

    def interrupted_after_epoch_2(record):
        log(record)
        if record.get("event") == "epoch" and record["epoch"] == 2:
            raise KeyboardInterrupt

    ctx.log = interrupted_after_epoch_2
    with pytest.raises(KeyboardInterrupt):
        get_strategy("differentiable").from_options(OPTIONS).run(ctx)
    resumed = get_strategy("differentiable").from_options(OPTIONS)
    got = resumed.run(make_ctx(data, tmp_path / "b"))
    assert resumed.history == whole.history
    assert [c.genotype for c in got] == [c.genotype for c in expected]
    assert [c.score for c in got] == [c.score for c in expected]
    events = [r["event"] for r in read_log(tmp_path / "b" / "log.jsonl")]
    assert events.count("resume") == 1 and events.count("epoch") == 3
    # a finished search is loaded, not redone; another config is refused
    again = get_strategy("differentiable").from_options(OPTIONS)
    assert [c.score for c in again.run(make_ctx(data, tmp_path / "b"))] == [c.score for c in expected]
    with pytest.raises(NasDoseError, match="different search"):
        get_strategy("differentiable").from_options({**OPTIONS, "epochs": 4}).run(make_ctx(data, tmp_path / "b"))


def test_hinge_pushes_away_from_a_reference(data):
    """A reference equal to the first search's identity prediction: with the hinge on, α must
    move less toward identity (the only way to differ from it is to drop the inputs)."""
    plain = get_strategy("differentiable").from_options(OPTIONS)
    first = plain.run(make_ctx(data, diversity=DiversityConfig(mode="sequential")))[0]
    assert set(first.predictions) == {"pt_4", "pt_5", "pt_6", "pt_7", "pt_8", "pt_9"}  # arch ones too
    ctx = make_ctx(data, references=[first.predictions],
                   diversity=DiversityConfig(mode="sequential", margin=0.5, weight=50.0))
    pushed = get_strategy("differentiable").from_options(OPTIONS)
    pushed.run(ctx)
    assert pushed.history[-1]["path"][1] < plain.history[-1]["path"][1]
    with pytest.raises(NasDoseError, match="no prediction for architecture patient"):
        get_strategy("differentiable").from_options(OPTIONS).run(
            make_ctx(data, references=[{"pt_4": first.predictions["pt_4"]}]))


def test_most_probable_enumerates_in_probability_order():
    space = get_space("lenas")
    base = space.sample(np.random.RandomState(0))
    probs = {"down.op1": [0.1, 0.2, 0.3, 0.4, 0.0], "down.connect": [0.9, 0.1]}
    got = most_probable(space, base, probs, 4)
    picks = [(g.choices["down.op1"], g.choices["down.connect"]) for g, _ in got]
    # 0.4·0.9 > 0.3·0.9 > 0.2·0.9 > 0.1·0.9 = 0.09 > 0.4·0.1 (the first runner-up connect)
    assert picks == [("dep_conv", "identity"), ("dil_conv", "identity"), ("se_conv", "identity"),
                     ("identity", "identity")]
    assert [lp for _, lp in got] == pytest.approx(np.log([0.36, 0.27, 0.18, 0.09]))
    assert all(g.choices["up.up"] == base.choices["up.up"] for g, _ in got)


def test_tau_schedule_and_config_checks():
    cfg = DifferentiableSearch.from_options({"mode": "gumbel", "epochs": 3, "tau_start": 4.0, "tau_end": 1.0}).config
    assert [tau_at(cfg, e) for e in range(3)] == pytest.approx([4.0, 2.0, 1.0])
    with pytest.raises(ConfigError, match="warmup_epochs"):
        DifferentiableSearch.from_options({"epochs": 2, "warmup_epochs": 2})
    with pytest.raises(ConfigError, match="unknown config key 'lr'"):
        DifferentiableSearch.from_options({"lr": 1.0})


def test_gumbel_mode_is_reproducible(data, tmp_path):
    opts = {**OPTIONS, "mode": "gumbel", "epochs": 2}
    a = get_strategy("differentiable").from_options(opts)
    a.run(make_ctx(data, tmp_path / "a"))
    b = get_strategy("differentiable").from_options(opts)
    b.run(make_ctx(data))
    assert a.history == b.history  # the same seed draws the same Gumbel samples
    assert torch.tensor(a.history[-1]["path"]).sum().item() == pytest.approx(1.0)
