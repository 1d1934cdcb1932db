"""CandidateEvaluator on a tiny synthetic data set: SPOS weight inheritance scores exactly the
network that is built, one supernet per width/depth, the persisted cache, and the "train" and
"finetune" modes."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nas_dose.config import ConfigError, from_dict
from nas_dose.data.store import write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.errors import NasDoseError
from nas_dose.io import save_checkpoint
from nas_dose.pool import Candidate, DiversityConfig
from nas_dose.runtime import Runtime, RuntimeConfig
from nas_dose.search_spaces import Genotype, count_params, genotype_from_dict, get_space
from nas_dose.strategies.base import SearchContext
from nas_dose.strategies.evaluator import (
    CandidateEvaluator,
    EvaluatorConfig,
    FairPaths,
    _digest,
    inherited_weights,
    ranked,
)
from nas_dose.strategies.evolution import EvolutionConfig, EvolutionStrategy
from nas_dose.strategies.random_search import RandomConfig, RandomStrategy

WEIGHT, ARCH, DIVERSITY = ["pt_1", "pt_2", "pt_3"], ["pt_4", "pt_5"], ["pt_6"]
TINY = {"stem": 4, "widths": [8, 16]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.h5"
    write_dataset(path, synth_patients(6, 16, 0), source="synth", grid=16, total=6)
    return path


def context(data: Path, state: Path | None, space: str = "lenas", macro: dict = TINY,
            mode: str = "pool") -> SearchContext:
    return SearchContext(get_space(space), macro, data, Runtime(RuntimeConfig(device="cpu")), 0, WEIGHT, ARCH,
                         DIVERSITY, diversity=DiversityConfig(mode=mode), state_dir=state,
                         log_path=None if state is None else state / "log.jsonl")


def trained_supernets(state: Path) -> list[dict]:
    """The supernets a context persisted under `state` (its evaluator's supernet file)."""
    return torch.load(state / "evaluator" / "supernet.pt", weights_only=True)["supernets"]


def genotypes(ctx: SearchContext, n: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    return [ctx.space.sample(rng, ctx.macro) for _ in range(n)]


def test_inherit_scores_the_built_network_with_shared_weights_and_caches(data, tmp_path):
    ctx = context(data, tmp_path)
    ev = CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=3))
    g1, g2 = genotypes(ctx, 2)
    c1, c2 = ev.score(g1), ev.score(g2)
    assert ev.scored == 2 and ev.score(g1) is c1 and ev.scored == 2  # a cache hit scores nothing
    assert len(trained_supernets(tmp_path)) == 1  # one supernet for all
    assert 0 < c1.score < 70 and np.isfinite(c2.score)
    assert c1.metrics["params"] == count_params(ctx.space.build(g1))
    assert set(c1.predictions) == set(DIVERSITY) and c1.predictions["pt_6"].shape == (16, 16, 16)
    # the single path with shared weights is exactly the final network with inherited weights
    supernet, _ = ev._supernet(g1)
    errors, _ = ctx.evaluate(supernet.subnet(g1), ARCH)
    assert c1.score == pytest.approx(np.mean(list(errors.values())), rel=1e-5)
    # and so is the plain network built from g1 with its weights from the saved supernet file
    built = ctx.space.build(g1).eval()
    built.load_state_dict(inherited_weights(tmp_path / "evaluator" / "supernet.pt", g1))
    supernet.fix(g1)
    x = torch.randn(1, 10, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(built(x), supernet.eval()(x), rtol=0, atol=0)
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["score"] for r in logged if r["event"] == "scored"] == [c1.score, c2.score]


def test_a_resumed_evaluator_rescores_nothing_and_retrains_no_supernet(data, tmp_path, monkeypatch):
    ctx = context(data, tmp_path)
    g1, g2 = genotypes(ctx, 2, seed=1)
    first = CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=3)).score(g1)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(CandidateEvaluator, "_fit", no_training)
    ev = CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=3))
    again = ev.score(g1)
    assert ev.scored == 0 and again.score == first.score and again.metrics == first.metrics
    np.testing.assert_array_equal(again.predictions["pt_6"], first.predictions["pt_6"])
    ev.score(g2)  # a new genotype: scored on the saved supernet
    assert ev.scored == 1
    with pytest.raises(NasDoseError, match="evaluator"):
        CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=4))


def test_inherit_keeps_one_supernet_per_width_and_depth(data, tmp_path):
    ctx = context(data, tmp_path, space="lenas_levels", macro={"stem": 4, "widths": [4, 8, 8, 8]}, mode="none")
    ev = CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=2))
    base = genotypes(ctx, 1, seed=3)[0]
    variants = [{"width": 50, "depth": 2}, {"width": 100, "depth": 2}, {"width": 50, "depth": 2}]
    cands = [ev.score(ctx.space.genotype({**base.choices, **v, "enc0.op1": op}, ctx.macro))
             for v, op in zip(variants, ["conv", "conv", "identity"])]
    assert sorted((s["fixed"]["width"], s["fixed"]["depth"]) for s in trained_supernets(tmp_path)) == \
        [(50, 2), (100, 2)]
    assert all(c.predictions is None for c in cands)  # no diversity: no predictions kept
    assert cands[0].metrics["params"] < cands[1].metrics["params"]


def test_evaluators_sharing_a_supernet_file_keep_each_others_supernets(data, tmp_path):
    """As the ranks of a distributed search do: both read the file before either stores."""
    ctx = context(data, tmp_path, space="lenas_levels", macro={"stem": 4, "widths": [4, 8, 8, 8]}, mode="none")
    first, second = (CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=2)) for _ in range(2))
    base = genotypes(ctx, 1, seed=3)[0].choices
    first._saved_supernets(), second._saved_supernets()
    for ev, width in ((first, 50), (second, 100)):
        ev.score(ctx.space.genotype({**base, "width": width, "depth": 2}, ctx.macro))
    assert sorted(s["fixed"]["width"] for s in trained_supernets(tmp_path)) == [50, 100]


def test_a_saved_supernet_file_scores_only_the_non_op_slots_it_was_trained_for(data, tmp_path):
    macro = {"stem": 4, "widths": [4, 8, 8, 8]}
    ctx = context(data, tmp_path, space="lenas_levels", macro=macro, mode="none")
    base = ctx.space.genotype({**genotypes(ctx, 1, seed=3)[0].choices, "width": 50, "depth": 2}, ctx.macro)
    trained = CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=2)).score(base)
    saved = tmp_path / "evaluator" / "supernet.pt"
    reuse = CandidateEvaluator(context(data, None, space="lenas_levels", macro=macro, mode="none"),
                               EvaluatorConfig(supernet_steps=2, supernet=str(saved)))
    assert reuse.score(base).score == trained.score
    other = ctx.space.genotype({**base.choices, "width": 100}, ctx.macro)
    with pytest.raises(NasDoseError, match=f"^{saved}: holds no supernet for depth=2, width=100"):
        reuse.score(other)
    with pytest.raises(ConfigError, match="evaluator.supernet"):
        from_dict(EvaluatorConfig, {"mode": "train", "supernet": str(saved)})


def test_train_mode_scores_do_not_depend_on_the_order(data):
    ctx = context(data, None, mode="none")
    g1, g2 = genotypes(ctx, 2, seed=2)
    cfg = EvaluatorConfig(mode="train", train_steps=2)
    a = CandidateEvaluator(ctx, cfg)
    b = CandidateEvaluator(ctx, cfg)
    forward = [a.score(g1).score, a.score(g2).score]
    backward = [b.score(g2).score, b.score(g1).score]
    assert forward == backward[::-1]
    assert forward[0] != forward[1]


def test_a_resumed_search_with_a_larger_budget_scores_only_the_new_candidates(data, tmp_path):
    ctx = context(data, tmp_path, mode="none")
    made: list[CandidateEvaluator] = []

    def factory(c):
        made.append(CandidateEvaluator(c, EvaluatorConfig(supernet_steps=2)))
        return made[-1]

    short = RandomStrategy(from_dict(RandomConfig, {"budget": 2}), scorer=factory).run(ctx)
    longer = RandomStrategy(from_dict(RandomConfig, {"budget": 3}), scorer=factory).run(
        context(data, tmp_path, mode="none"))
    assert [m.scored for m in made] == [2, 1]
    assert {c.genotype.key(): c.score for c in short}.items() <= {c.genotype.key(): c.score for c in longer}.items()


@pytest.mark.parametrize("mode", ["pool", "sequential"])
def test_evolution_with_diversity_on_the_real_evaluator(data, tmp_path, mode):
    reference = CandidateEvaluator(context(data, None, mode="sequential"), EvaluatorConfig(supernet_steps=2)).score(
        genotypes(context(data, None), 1, seed=9)[0])
    ctx = context(data, tmp_path, mode=mode)
    ctx.references = [reference.predictions] if mode == "sequential" else []
    cfg = from_dict(EvolutionConfig, {"budget": 4, "population": 2, "sample": 2, "members": 2,
                                      "evaluator": {"supernet_steps": 2}})
    cands = EvolutionStrategy(cfg).run(ctx)
    kept = DIVERSITY + (ARCH if mode == "sequential" else [])
    assert len(cands) == 4 and all(sorted(c.predictions) == sorted(kept) for c in cands)
    assert sorted(reference.predictions) == sorted(DIVERSITY + ARCH)


def test_finetune_trains_each_path_on_from_the_supernet_and_does_not_depend_on_the_order(data, tmp_path,
                                                                                        monkeypatch):
    ctx = context(data, tmp_path, mode="none")
    g1, g2 = genotypes(ctx, 2, seed=4)
    inherited = CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=3))
    start = inherited.score(g1).score
    saved = str(tmp_path / "evaluator" / "supernet.pt")
    cfg = EvaluatorConfig(mode="finetune", supernet_steps=3, finetune_steps=2)
    # the supernet trained on first use, between the genotype's init and its finetuning, or not at all
    a, b = CandidateEvaluator(context(data, None, mode="none"), cfg), CandidateEvaluator(context(
        data, None, mode="none"), EvaluatorConfig(mode="finetune", supernet_steps=3, finetune_steps=2, supernet=saved))
    forward = [a.score(g1).score, a.score(g2).score]
    backward = [b.score(g2).score, b.score(g1).score]
    assert forward == backward[::-1] and forward[0] != start
    # the same start: the network built from g1 with the supernet's weights; a step more, another score
    supernet, _ = inherited._supernet(g1)
    torch.testing.assert_close(a._supernet(g1)[0].state_dict(), supernet.state_dict(), rtol=0, atol=0)
    more = CandidateEvaluator(context(data, None, mode="none"), replace(cfg, finetune_steps=3))
    assert more.score(g1).score not in (forward[0], start)
    # without its training steps, the finetuned network is the inherited path exactly
    real_fit = CandidateEvaluator._fit
    monkeypatch.setattr(CandidateEvaluator, "_fit", lambda self, net, params, steps, seed, desc, **kw:
                        None if desc == "candidate" else real_fit(self, net, params, steps, seed, desc, **kw))
    untrained = CandidateEvaluator(context(data, None, mode="none"), cfg).score(g1).score
    assert untrained == pytest.approx(start, rel=1e-6)


def test_finetune_scores_are_cached_apart_from_inherit_scores(data, tmp_path, monkeypatch):
    ctx = context(data, tmp_path, mode="none")
    g1 = genotypes(ctx, 1, seed=5)[0]
    cfg = EvaluatorConfig(mode="finetune", supernet_steps=3, finetune_steps=2)
    fits: list[tuple[str, int]] = []
    real_fit = CandidateEvaluator._fit

    def counted(self, net, params, steps, seed, desc, **kwargs):
        fits.append((desc, steps))
        return real_fit(self, net, params, steps, seed, desc, **kwargs)

    monkeypatch.setattr(CandidateEvaluator, "_fit", counted)
    first = CandidateEvaluator(ctx, cfg).score(g1)
    assert fits == [("supernet", 3), ("candidate", 2)] and len(trained_supernets(tmp_path)) == 1
    settings = json.loads((tmp_path / "evaluator" / "settings.json").read_text())["evaluator"]
    assert settings["mode"] == "finetune" and settings["finetune_steps"] == 2
    resumed = CandidateEvaluator(ctx, cfg)
    assert resumed.score(g1).score == first.score and resumed.scored == 0 and len(fits) == 2
    for other in (EvaluatorConfig(supernet_steps=3), replace(cfg, finetune_steps=3)):
        with pytest.raises(NasDoseError, match=r"settings.json: the cached scores were made with other settings"):
            CandidateEvaluator(ctx, other)
    # an inherit cache does not record finetune_steps: those written before it existed stay valid
    inherit_ctx = context(data, tmp_path / "inherit", mode="none")
    CandidateEvaluator(inherit_ctx, EvaluatorConfig(supernet_steps=3))
    assert "finetune_steps" not in json.loads((tmp_path / "inherit" / "evaluator" / "settings.json").read_text())[
        "evaluator"]



def test_only_a_supernet_that_is_trained_or_scored_with_is_prepared_on_the_device(data, tmp_path, monkeypatch):
    """Mode finetune copies each path's weights out of a supernet: one it loads is never prepared
    (moved to the device, compiled); mode inherit prepares each supernet once, for all its paths."""
    prepared: list[str] = []

    def recording(ctx: SearchContext) -> SearchContext:
        real = ctx.runtime.prepare
        monkeypatch.setattr(ctx.runtime, "prepare", lambda m: prepared.append(type(m).__name__) or real(m))
        return ctx

    g1, g2 = genotypes(context(data, None), 2, seed=6)
    inherit = CandidateEvaluator(recording(context(data, tmp_path, mode="none")), EvaluatorConfig(supernet_steps=2))
    inherit.score(g1), inherit.score(g2)
    assert prepared == ["Supernet"]  # trained, then scored with
    prepared.clear()
    saved = str(tmp_path / "evaluator" / "supernet.pt")
    cfg = EvaluatorConfig(mode="finetune", supernet_steps=2, finetune_steps=1, supernet=saved)
    finetune = CandidateEvaluator(recording(context(data, None, mode="none")), cfg)
    finetune.score(g1), finetune.score(g2)
    assert prepared == ["CellUNet", "CellUNet"]  # the two candidates only
    prepared.clear()
    trained = CandidateEvaluator(recording(context(data, None, mode="none")), replace(cfg, supernet=None))
    trained.score(g1), trained.score(g2)
    assert prepared == ["Supernet", "CellUNet", "CellUNet"]  # trained once, then the candidates


def test_a_resumed_search_scores_none_of_the_entries_an_older_nasdose_named_after_another_key(
        data, tmp_path, monkeypatch):
    """Entries are named after their genotype's key, whose form changed: an older nasdose kept
    random cells beyond a lenas_levels genotype's depth. Resumed, the search finds such entries
    by the genotype they hold and scores none again."""
    ctx = context(data, tmp_path, space="lenas_levels", macro={"stem": 4, "widths": [4, 8, 8, 8]}, mode="none")
    scored: list[Genotype] = []
    monkeypatch.setattr(CandidateEvaluator, "_score",
                        lambda self, g: scored.append(g) or Candidate(g, float(len(scored)), {"params": 1.0}))
    cfg = from_dict(RandomConfig, {"budget": 6, "evaluator": {"supernet_steps": 2}})
    first = RandomStrategy(cfg).run(ctx)
    assert len(scored) == 6
    slots, aged = ctx.space.slots(), 0
    for path in sorted((tmp_path / "evaluator").glob("*.pt")):  # rewritten as the older nasdose wrote them
        state = torch.load(path, weights_only=True)
        g = genotype_from_dict(state["genotype"])
        unused = [s for s in slots if s not in ctx.space.active_slots(g)]
        old = Genotype(g.space, g.version, {**g.choices, **{s: slots[s][-1] for s in unused}}, g.macro)
        path.unlink()
        save_checkpoint(path.parent / f"{_digest(old.key())}.pt", {**state, "genotype": old.to_dict()})
        aged += bool(unused)
    assert aged  # some of the networks drawn are shallower than 4 levels
    scored.clear()
    again = RandomStrategy(cfg).run(context(data, tmp_path, space="lenas_levels", macro=ctx.macro, mode="none"))
    assert scored == [] and [(c.genotype, c.score) for c in again] == [(c.genotype, c.score) for c in first]

def test_ranked_puts_failures_last_and_keeps_first_of_duplicates():
    ctx = context(Path("unused.h5"), None)
    g1, g2, g3 = genotypes(ctx, 3)
    cands = [Candidate(g1, float("nan")), Candidate(g2, 3.0), Candidate(g3, 2.0), Candidate(g2, 1.0)]
    best = ranked(cands)
    assert [c.genotype.key() for c in best] == [g3.key(), g2.key(), g1.key()]
    assert best[1].score == 3.0


def test_config_is_validated():
    with pytest.raises(ConfigError, match="lr"):
        from_dict(EvaluatorConfig, {"lr": 0})
    with pytest.raises(ConfigError, match="mode"):
        from_dict(EvaluatorConfig, {"mode": "oneshot"})
    with pytest.raises(ConfigError, match="'evaluator.finetune_steps': must be at least 1, got 0"):
        from_dict(EvaluatorConfig, {"mode": "finetune", "finetune_steps": 0})
    with pytest.raises(ConfigError, match="'evaluator.supernet': mode train uses no supernet"):
        from_dict(EvaluatorConfig, {"mode": "train", "supernet": "supernet.pt"})
    assert from_dict(EvaluatorConfig, {"mode": "finetune", "supernet": "supernet.pt"}).supernet == "supernet.pt"


def test_hard_constraints_reject_a_genotype_before_training(data, tmp_path, monkeypatch):
    """max_params / max_flops: a genotype over a limit scores inf without any training, is logged
    and cached as rejected, and a search's pool holds only genotypes within the limits."""
    ctx = context(data, tmp_path)
    gs = genotypes(ctx, 6, seed=3)
    sizes = sorted(count_params(ctx.space.build(g)) for g in gs)
    limit = sizes[len(sizes) // 2]
    monkeypatch.setattr(CandidateEvaluator, "_fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fit")))
    ev = CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=3, max_params=limit - 1))
    big = next(g for g in gs if count_params(ctx.space.build(g)) >= limit)
    rejected = ev.score(big)
    assert rejected.score == float("inf") and rejected.metrics["rejected"] == 1.0
    assert rejected.predictions is None and not (tmp_path / "evaluator" / "supernet.pt").exists()
    assert CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=3, max_params=limit - 1)).score(big).score == \
        float("inf")  # from the cache
    with pytest.raises(ConfigError, match="max_flops"):
        from_dict(EvaluatorConfig, {"max_flops": 0})


def test_a_pool_holds_only_genotypes_within_the_limits(data):
    from nas_dose.pool import MATRICES, select_pool

    ctx = context(data, None)
    sizes = sorted(count_params(ctx.space.build(g)) for g in genotypes(ctx, 8, seed=0))
    limit = sizes[len(sizes) // 2]
    cfg = from_dict(RandomConfig, {"budget": 8, "evaluator": {"supernet_steps": 3, "max_params": limit}})
    cands = RandomStrategy(cfg).run(ctx)
    rejected = [c for c in cands if c.metrics.get("rejected")]
    assert rejected and all(c.metrics["params"] > limit for c in rejected)
    n = len(cands)
    chosen = select_pool(cands, n, 0.0, {k: np.zeros((n, n)) for k in MATRICES})
    assert chosen and all(cands[i].metrics["params"] <= limit for i in chosen)


def test_fair_paths_train_every_op_of_a_slot_equally_often_and_keep_the_fixed_slots():
    space = get_space("lenas_levels")
    macro = {"stem": 4, "widths": [4, 8, 8, 8]}
    supernet = SimpleNamespace(space=space, macro=macro, fixed={"width": 50, "depth": 2})
    draw = FairPaths(supernet, np.random.RandomState(0))
    slots = space.slots()
    n = max(len(slots[s]) for s in space.op_slots())
    paths = [draw() for _ in range(n)]
    for slot in space.op_slots():
        k = len(slots[slot])
        for start in range(0, n - k + 1, k):  # each whole round holds every op once
            assert sorted(map(str, (p.choices[slot] for p in paths[start:start + k]))) == sorted(map(str, slots[slot]))
    assert all(p.choices["width"] == 50 and p.choices["depth"] == 2 for p in paths)
    assert len({p.key() for p in paths}) > 1


def test_a_fair_supernet_is_recorded_and_not_mixed_with_a_uniform_one(data, tmp_path):
    ctx = context(data, tmp_path, mode="none")
    g = genotypes(ctx, 1, seed=7)[0]
    fair = CandidateEvaluator(ctx, EvaluatorConfig(supernet_steps=3, sampling="fair")).score(g)
    saved = tmp_path / "evaluator" / "supernet.pt"
    assert torch.load(saved, weights_only=True)["sampling"] == "fair"
    assert json.loads((tmp_path / "evaluator" / "settings.json").read_text())["evaluator"]["sampling"] == "fair"
    uniform = CandidateEvaluator(context(data, tmp_path / "uniform", mode="none"),
                                 EvaluatorConfig(supernet_steps=3)).score(g)
    assert uniform.score != fair.score  # other paths trained the weights
    # a uniform evaluator's cache does not name the default: caches written before the key stay valid
    assert "sampling" not in json.loads((tmp_path / "uniform" / "evaluator" / "settings.json").read_text())["evaluator"]
    with pytest.raises(NasDoseError, match=rf"^{saved}: supernets of another search: sampling fair \(this search"):
        CandidateEvaluator(context(data, None, mode="none"), EvaluatorConfig(supernet_steps=3, supernet=str(saved)))
    # a file written before the key was made by uniform sampling
    old = tmp_path / "old.pt"
    state = torch.load(tmp_path / "uniform" / "evaluator" / "supernet.pt", weights_only=True)
    del state["sampling"]
    save_checkpoint(old, state)
    reuse = CandidateEvaluator(context(data, None, mode="none"), EvaluatorConfig(supernet_steps=3, supernet=str(old)))
    assert reuse.score(g).score == uniform.score
    with pytest.raises(NasDoseError, match=r"sampling uniform \(this search: fair\)"):
        CandidateEvaluator(context(data, None, mode="none"),
                           EvaluatorConfig(supernet_steps=3, supernet=str(old), sampling="fair"))
