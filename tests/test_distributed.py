"""Distributed runs (nas_dose.distributed): the sharding rules in one process, then 2 CPU
processes started by torchrun (Gloo) against one-process runs with the same global batch and
seed: training (also resumed after a rank died), the differentiable search, evolution's
parallel scoring, ensemble members spread over the ranks, and the helpers themselves.

This file is also the script torchrun starts: `python tests/test_distributed.py MODE SPEC.json`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nas_dose import cli, distributed
from nas_dose.config import from_dict, load_config
from nas_dose.data.dataset import DoseDataset, make_loader
from nas_dose.data.store import write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.errors import NasDoseError
from nas_dose.io import load_checkpoint, load_json, save_json
from nas_dose.models.factory import build_model
from nas_dose.pool import Candidate
from nas_dose.runtime import seed_everything
from nas_dose.search_spaces import Genotype, get_space, save_genotype
from nas_dose.strategies.evolution import EvolutionConfig, EvolutionStrategy
from nas_dose.training import Objective, TrainConfig, train_model

# Augmentation on: its draws depend on (seed, epoch, patient) only. SGD, not Adam: Adam does not
# see a gradient's scale, so it would hide a wrong average over the ranks.
COMMON = ["runtime.device=cpu", "runtime.threads=1", "log_every=2", "optim.name=sgd", "optim.lr=0.05",
          "epochs=2", "checkpoint_every=2", "data.batch_size=2"]
TRAIN = [*COMMON, "model.kwargs.widths=[4, 8, 16]"]
SEARCH = ["runtime.device=cpu", "runtime.threads=1", "macro.stem=4", "macro.widths=[8]", "pool_size=2",
          "diversity.mode=sequential", "options.epochs=2", "options.steps_per_epoch=2", "options.batch_size=2",
          "options.candidates=3", "options.track_score=false"]
DIE_AT = 5  # rank 1 dies after this step; rank 0 checkpointed step 4 (checkpoint_every=2)
EVOLUTION = {"budget": 9, "population": 5, "sample": 2}
LENAS = {"stem": 4, "widths": [8, 16]}
CLOSE = {"rtol": 1e-4, "atol": 1e-6}
# The genotype's float32 convolutions round differently on a batch of 1 than on a batch of 2
# (about 1e-6), which its instance norms magnify: one process stepping on two batches of 1
# instead of one of 2 ends 7e-5 away, as the two processes do; in float64 both agree to 1e-15.
LOOSE = {"rtol": 1e-3, "atol": 3e-4}


# ---------------------------------------------------------------------------------------------
# One process: the rules.

def test_launch_reads_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch() == distributed.Launch(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launch() == distributed.Launch(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(NasDoseError, match="RANK=4: must be below WORLD_SIZE=4"):
        distributed.launch()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(NasDoseError, match="WORLD_SIZE='two': expected an integer"):
        distributed.launch()


@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize("world, batch", [(2, 2), (2, 4), (3, 3)])
def test_the_ranks_batches_together_are_the_one_process_batches(n, world, batch):
    one = list(distributed.ShardedBatches(range(n), batch, even=True, rank_=0, world=1))
    assert one == [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    ranks = [list(distributed.ShardedBatches(range(n), batch, even=True, rank_=r, world=world))
             for r in range(world)]
    assert all(len(r) == len(one) for r in ranks)  # every rank steps as often as one process
    for k, whole in enumerate(one):
        together = sorted(i for r in ranks for i in r[k])
        assert all(len(r[k]) == len(ranks[0][k]) for r in ranks)
        if n % world == 0:
            assert together == whole
        else:  # the last step is filled up with the first items: at most world - 1 repeats
            assert set(together) >= set(whole) and len(together) - len(whole) < world
    exact = [list(distributed.ShardedBatches(range(n), batch, even=False, rank_=r, world=world))
             for r in range(world)]
    assert sorted(i for r in exact for b in r for i in b) == list(range(n))  # each item once
    assert [len(distributed.ShardedBatches(range(n), batch, even=False, rank_=r, world=world))
            for r in range(world)] == [len(r) for r in exact]


def test_a_batch_that_does_not_split_evenly_is_an_error():
    with pytest.raises(NasDoseError, match="batch size 3 does not split evenly over 2 processes"):
        distributed.ShardedBatches(range(6), 3, even=True, rank_=0, world=2)


def test_one_process_is_a_world_of_one(tmp_path):
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] == distributed.gather_objects([1, 2, 3])
    assert distributed.map_shards(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    assert distributed.on_main(lambda: 5) == 5 == distributed.broadcast_object(5)
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce(t, "mean") is t and t.tolist() == [1.0, 2.0]
    module = torch.nn.Linear(2, 2)
    assert distributed.data_parallel(module, torch.device("cpu")) is module
    with distributed.main_writes():
        save_json(tmp_path / "x.json", {"a": 1})
        assert distributed.writes_here()
    assert load_json(tmp_path / "x.json") == {"a": 1}


def test_sharded_loader_in_one_process_is_the_plain_loader(tmp_path):
    path = tmp_path / "d.h5"
    write_dataset(path, synth_patients(7, 16, seed=0), source="synth", grid=16)
    dataset = DoseDataset(path, None)
    plain = [b["id"] for b in make_loader(dataset, 3, shuffle=True, seed=4)]
    assert [b["id"] for b in make_loader(dataset, 3, shuffle=True, seed=4, shard="even")] == plain
    assert [b["id"] for b in make_loader(dataset, 3, shuffle=True, seed=4, shard="exact")] == plain


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["data", "info", "missing.h5"]) == 1
    assert "start it without torchrun" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Two processes (torchrun, Gloo on the CPU) against one.

def torchrun(mode: str, spec: dict[str, Any]) -> subprocess.CompletedProcess:
    """This file as the script of `torchrun --standalone --nproc_per_node=2`, one thread each."""
    file = Path(spec["out"]) / f"{mode}.json"
    file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, mode, str(file)], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 phantoms on a 16³ grid: 6 train (3 global batches of 2), 2 validation; beside them the
    genotype of `genotype_args`."""
    path = tmp_path_factory.mktemp("data") / "synth16.h5"
    write_dataset(path, synth_patients(8, 16, seed=0), source="synth", grid=16)
    space = get_space("lenas_levels")
    macro = {"in_channels": 10, "out_channels": 1, "stem": 4, "widths": [8, 16, 16, 16]}
    choices = {**space.sample(np.random.RandomState(1), macro).choices, "depth": 2, "width": 50}
    assert choices["dec1.op2"] == "zero"
    save_genotype(path.parent / "genotype.yaml", space.genotype(choices, macro))
    return path


def genotype_args(data: Path) -> list[str]:
    return [*COMMON, f"model.genotype={data.parent / 'genotype.yaml'}"]


@pytest.fixture(scope="module")
def two(tmp_path_factory, data) -> Path:
    """A 2-process training run in which rank 1 dies after step DIE_AT, then one 2-process job
    that resumes it, trains afresh, searches, evolves, trains an ensemble and exercises the
    helpers. Returns the folder of their outputs."""
    out = tmp_path_factory.mktemp("two")
    spec = {"out": str(out), "data": str(data)}
    crashed = torchrun("crash", spec)
    assert crashed.returncode != 0, crashed.stdout + crashed.stderr
    last = load_checkpoint(out / "crashed" / "checkpoints" / "last.pt")
    save_json(out / "crash_checkpoint.json", {"step": last["step"]})
    done = torchrun("main", spec)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


def train_once(data: Path, out: Path, args: list[str]) -> None:
    cfg = load_config(TrainConfig, overrides=args)
    seed_everything(cfg.seed)
    train_model(build_model(cfg.model), cfg, data, out)


def assert_same_run(run: Path, reference: Path, close: dict[str, float] = CLOSE, rel: float = 1e-5) -> None:
    """Same weights (last and best) within `close`, log and metrics within `rel`."""
    for name in ("checkpoints/last.pt", "best.pt"):
        got, want = load_checkpoint(run / name), load_checkpoint(reference / name)
        assert got.keys() == want.keys()
        for key, value in want["model"].items():
            torch.testing.assert_close(got["model"][key], value, **close)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (reference / "log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["epoch"]) for e in log] == [(e["step"], e["epoch"]) for e in ref]  # no line twice
    for e, r in zip(log, ref):
        assert e["loss"] == pytest.approx(r["loss"], rel=rel)
        assert (e["val_dose_score"] is None) == (r["val_dose_score"] is None)
        if r["val_dose_score"] is not None:
            assert e["val_dose_score"] == pytest.approx(r["val_dose_score"], rel=rel)
    got, want = load_json(run / "metrics.json"), load_json(reference / "metrics.json")
    assert got["steps"] == want["steps"] == 6 and got["best_epoch"] == want["best_epoch"]
    assert got["best_val_dose_score"] == pytest.approx(want["best_val_dose_score"], rel=rel)


@pytest.fixture(scope="module")
def one(tmp_path_factory, data) -> Path:
    """The one-process reference training run: batch 2, the same seed."""
    out = tmp_path_factory.mktemp("one") / "run"
    train_once(data, out, TRAIN)
    return out


@pytest.mark.slow
def test_ddp_training_matches_one_process_with_the_same_global_batch(two, one):
    assert_same_run(two / "fresh", one)
    assert not list((two / "fresh").rglob("*.tmp"))


@pytest.mark.slow
def test_ddp_trains_a_genotype_that_leaves_parameters_unused(two, data, tmp_path):
    train_once(data, tmp_path / "run", genotype_args(data))
    assert_same_run(two / "genotype", tmp_path / "run", LOOSE, rel=1e-3)


@pytest.mark.slow
def test_each_rank_trains_on_its_half_of_every_global_batch(two, data):
    cfg = load_config(TrainConfig, overrides=TRAIN)
    dataset = DoseDataset(data, "train", augment=cfg.data.augment, seed=cfg.seed)
    loader = make_loader(dataset, 2, shuffle=True, seed=cfg.seed)
    batches = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        batches += [list(b["id"]) for b in loader]
    rank0, rank1 = (load_json(two / f"ids{r}.json") for r in (0, 1))
    assert len(rank0) >= len(rank1) == DIE_AT
    assert [a + b for a, b in zip(rank0, rank1)] == batches[:DIE_AT]


@pytest.mark.slow
def test_a_run_whose_rank_died_resumes_from_rank_0s_checkpoint(two, one):
    assert load_json(two / "crash_checkpoint.json")["step"] == DIE_AT - 1
    assert_same_run(two / "crashed", one)  # resumed by 2 processes, each loading the checkpoint


@pytest.mark.slow
def test_distributed_differentiable_search_matches_one_process(two, data, tmp_path):
    reference = tmp_path / "search"
    assert cli.main(["search", "-q", "--data", str(data), "--out", str(reference), *SEARCH]) == 0
    from nas_dose.pool import load_pool

    got, want = load_pool(two / "search" / "pool.yaml"), load_pool(reference / "pool.yaml")
    assert [m.genotype for m in got.members] == [m.genotype for m in want.members]
    assert [m.search_score for m in got.members] == pytest.approx([m.search_score for m in want.members], rel=1e-4)
    for k in range(2):  # α after every epoch, the supernet's weights, every candidate's score
        state = f"state/search{k}/differentiable.pt"
        g, w = load_checkpoint(two / "search" / state), load_checkpoint(reference / state)
        for key, value in w["supernet"].items():
            torch.testing.assert_close(g["supernet"][key], value, **CLOSE)
        result = f"state/search{k}/differentiable_result.pt"
        g, w = load_checkpoint(two / "search" / result), load_checkpoint(reference / result)
        np.testing.assert_allclose([[p for s in sorted(h) for p in h[s]] for h in g["history"]],
                                   [[p for s in sorted(h) for p in h[s]] for h in w["history"]], rtol=1e-5)
        assert [c["score"] for c in g["candidates"]] == pytest.approx([c["score"] for c in w["candidates"]], rel=1e-4)
    log = [json.loads(line) for line in (two / "search" / "search_log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (reference / "search_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log] == [r["event"] for r in ref]  # one copy of each record
    epochs = [(r, s) for r, s in zip(log, ref) if r["event"] == "epoch"]
    assert all(r["weight_batches"] == s["weight_batches"] and r["arch_batches"] == s["arch_batches"] for r, s in epochs)
    assert all(r["weight_loss"] == pytest.approx(s["weight_loss"], rel=1e-5) for r, s in epochs)


class CountingScorer:
    """Score = the number of op slots that differ from a fixed genotype; `calls` lists the
    genotypes this process scored, in order (no cache: a repeated child is scored again)."""

    def __init__(self) -> None:
        self.target = get_space("lenas").sample(np.random.RandomState(12345), LENAS)
        self.calls: list[dict[str, Any]] = []

    def score(self, g: Genotype) -> Candidate:
        self.calls.append(g.to_dict())
        return Candidate(g, float(sum(g.choices[s] != v for s, v in self.target.choices.items())))


def evolve(out: Path) -> list[dict[str, Any]]:
    """An evolution on the fake objective; the genotypes this process scored."""
    from test_evolution import fake_context

    scorer = CountingScorer()
    EvolutionStrategy(from_dict(EvolutionConfig, EVOLUTION), scorer=lambda _: scorer).run(
        fake_context(get_space("lenas"), out))
    return scorer.calls


@pytest.mark.slow
def test_evolution_scores_its_random_start_over_the_ranks_with_one_process_results(two, tmp_path):
    evolve(tmp_path)

    def records(folder: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (folder / "log.jsonl").read_text().splitlines()]

    assert records(two / "evolution") == records(tmp_path)
    got = load_checkpoint(two / "evolution" / "state" / "evolution.pt")
    want = load_checkpoint(tmp_path / "state" / "evolution.pt")
    assert got["children"] == want["children"] and torch.equal(got["rng"]["keys"], want["rng"]["keys"])
    children, population = want["children"], EVOLUTION["population"]
    by_rank = load_json(two / "results.json")["evolution_calls"]
    # the random start, one child per rank at a time; each later child needs the score before it
    assert by_rank[1] == [children[i] for i in range(1, population, 2)]
    assert by_rank[0] == [c for i, c in enumerate(children) if i >= population or i % 2 == 0]


@pytest.mark.slow
def test_ensemble_members_are_spread_over_the_ranks(two, data, tmp_path):
    from test_ensemble import SETTINGS

    from nas_dose.ensemble import EnsembleConfig, Inputs, run

    metrics = run(load_config(EnsembleConfig, overrides=SETTINGS), Inputs(two / "pool.yaml", data), tmp_path / "ens")
    got = load_json(two / "ensemble" / "metrics.json")
    assert got["members"].keys() == metrics["members"].keys() and len(got["members"]) == 3
    for name, m in metrics["members"].items():  # each member trained by one rank alone: equal
        assert got["members"][name]["dose_score"] == pytest.approx(m["dose_score"], rel=1e-6)
    assert got["ensemble"]["weights"] == pytest.approx(metrics["ensemble"]["weights"], rel=1e-6)
    assert load_json(two / "results.json")["ensemble_members_by_rank"] == {"0": ["a", "c"], "1": ["b"]}


@pytest.mark.slow
def test_helpers_across_two_ranks(two):
    seen = load_json(two / "results.json")["helpers"]
    for r, s in enumerate(seen):
        assert s["rank"] == r and s["world"] == 2 and s["shard"] == list(range(r, 7, 2))
        assert s["gathered"] == [i * i for i in range(7)] == s["mapped"]
        assert s["sum"] == 1.0 and s["mean"] == 0.5 and s["max"] == 1.0
        assert s["broadcast"] == "from rank 0" and s["on_main"] == 0
        assert s["map_error"] == "item 3 is bad" and s["on_main_error"] == "only rank 0 checks"
        assert s["alone"] == [1, 0, True] and s["writes_here"] == (r == 0)
    assert load_json(two / "written.json") == {"rank": 0}


# ---------------------------------------------------------------------------------------------
# The script torchrun runs in each process.

def _helpers(out: Path) -> dict[str, Any]:
    """What each rank sees of the helpers (gathered by the test)."""
    me = distributed.rank()
    seen: dict[str, Any] = {"rank": me, "world": distributed.world_size(), "shard": distributed.shard(list(range(7)))}
    seen["gathered"] = distributed.gather_objects([i * i for i in seen["shard"]])
    seen["mapped"] = distributed.map_shards(lambda i: i * i, list(range(7)))
    for op in ("sum", "mean", "max"):
        seen[op] = distributed.all_reduce(torch.tensor([float(me)]), op).item()  # type: ignore[arg-type]
    seen["broadcast"] = distributed.broadcast_object(f"from rank {me}")
    seen["on_main"] = distributed.on_main(distributed.rank)

    def bad(i: int) -> int:
        if i == 3:
            raise NasDoseError(f"item {i} is bad")
        return i

    def check() -> None:
        raise NasDoseError("only rank 0 checks")

    for key, call in (("map_error", lambda: distributed.map_shards(bad, list(range(5)))),
                      ("on_main_error", lambda: distributed.on_main(check))):
        try:
            call()
        except NasDoseError as e:
            seen[key] = str(e)
    with distributed.alone():
        seen["alone"] = [distributed.world_size(), distributed.rank(), distributed.writes_here()]
    seen["writes_here"] = distributed.writes_here()
    save_json(out / "written.json", {"rank": me})  # only rank 0's lands
    return seen


def _ensemble(data: Path, out: Path) -> dict[str, list[str]]:
    """A 3-member ensemble of test_ensemble's pool; the members each rank trained."""
    from test_ensemble import GENOTYPES, MACRO, SETTINGS

    from nas_dose import ensemble
    from nas_dose.pool import MATRICES, Pool, PoolMember, save_pool

    space = get_space("lenas")
    members = [PoolMember(name, space.genotype(choices, MACRO), 1.0 + i)
               for i, (name, choices) in enumerate(GENOTYPES.items())]
    save_pool(out / "pool.yaml", Pool("lenas", "hand", 0, members, {k: np.zeros((3, 3)) for k in MATRICES}))
    distributed.barrier()
    trained: list[str] = []

    def train_model_here(model: Any, config: Any, data: Path, folder: Path, **kwargs: Any) -> Any:
        trained.append(Path(folder).name)
        return train_model(model, config, data, folder, **kwargs)

    ensemble.train_model = train_model_here  # type: ignore[assignment]
    cfg = load_config(ensemble.EnsembleConfig, overrides=SETTINGS)
    ensemble.run(cfg, ensemble.Inputs(out / "pool.yaml", data), out / "ensemble")
    return {str(r): names for r, names in enumerate(distributed.gather_objects([trained]))}


def _main(spec: dict[str, Any]) -> None:
    out, data = Path(spec["out"]), Path(spec["data"])
    torch.set_num_threads(1)
    with distributed.session():
        results: dict[str, Any] = {"helpers": distributed.gather_objects([_helpers(out)])}
        assert cli.main(["train", "--data", str(data), "--out", str(out / "crashed"), "--resume", *TRAIN]) == 0
        assert cli.main(["train", "--data", str(data), "--out", str(out / "fresh"), *TRAIN]) == 0
        assert cli.main(["train", "--data", str(data), "--out", str(out / "genotype"), *genotype_args(data)]) == 0
        assert cli.main(["search", "--data", str(data), "--out", str(out / "search"), *SEARCH]) == 0
        results["evolution_calls"] = distributed.gather_objects([evolve(out / "evolution")])
        results["ensemble_members_by_rank"] = _ensemble(data, out)
        save_json(out / "results.json", results)


class IdsObjective(Objective):
    """The default loss; records the patients of each of this rank's batches."""

    def __init__(self) -> None:
        self.ids: list[list[str]] = []

    def loss(self, pred: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        self.ids.append(list(batch["id"]))
        return super().loss(pred, batch)

    def state_dict(self) -> dict[str, Any]:  # an objective's state restores it (exact resume relies on it)
        return {"ids": [list(i) for i in self.ids]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ids = [list(i) for i in state["ids"]]


def _crash(spec: dict[str, Any]) -> None:
    out, data = Path(spec["out"]), Path(spec["data"])
    torch.set_num_threads(1)
    cfg = load_config(TrainConfig, overrides=TRAIN)
    objective = IdsObjective()

    def die(step: int) -> None:
        # a plain write: every rank's own file, not only the main rank's (nas_dose.io)
        (out / f"ids{distributed.rank()}.json").write_text(json.dumps(objective.ids))
        if step == DIE_AT and distributed.rank() == 1:
            os._exit(3)  # no clean-up, as if killed

    with distributed.session():
        seed_everything(cfg.seed)
        train_model(build_model(cfg.model), cfg, data, out / "crashed", on_step=die, objective=objective)


if __name__ == "__main__":
    {"crash": _crash, "main": _main}[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
