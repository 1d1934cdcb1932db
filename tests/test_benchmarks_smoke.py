"""Smoke test of the benchmark suite: it imports, runs one benchmark at a trivial size and
returns well-formed, positive, finite ratios. No timing is asserted (timings are the suite's
output, not a property of the code)."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nas_dose.errors import NasDoseError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_throughput
        import run_suite

        import common
        yield common, bench_throughput, run_suite
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_throughput_benchmark_at_a_trivial_size(suite):
    common, bench_throughput, _ = suite
    tiny = common.Workload(grid=16, batch=1, stem=2, widths=(4, 8, 16), warmup=1, repeats=2)
    res = bench_throughput.run(quick=True, device="cpu", w=tiny)

    assert res["benchmark"] == "throughput" and res["device"] == "cpu"
    assert res["workload"]["grid"] == 16 and res["runtime"]["device"] == "cpu"
    check = res["measurements"]["check"]
    assert check["flops_genotype"] == check["flops_plain"] > 0
    assert check["params_genotype"] == check["params_plain"]
    assert check["max_abs_output_difference"] < 1e-4
    quantities = [r["quantity"] for r in res["ratios"]]
    assert len(quantities) == 4 and any("noise floor" in q for q in quantities)
    assert any("training" in q for q in quantities) and any("inference" in q for q in quantities)
    for r in res["ratios"]:
        assert set(r) >= {"quantity", "value", "target", "status", "detail"}
        assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] > 0
        assert r["status"] in ("met", "NOT MET", "info")
    json.dumps(res, allow_nan=False)  # the suite writes it as JSON

    table = common.format_table(common.table_rows("throughput", res))
    assert table.count("\n") == 1 + len(res["ratios"]) and "genotype ÷ plain U-Net" in table


def test_the_suite_marks_a_missing_benchmark(suite):
    _, _, run_suite = suite
    outcome = run_suite.run_one("bench_not_written", quick=True, device="cpu")
    assert outcome["status"] == "missing" and "bench_not_written.py" in outcome["reason"]


def test_side_by_side_benchmark_at_a_trivial_size(suite, monkeypatch):
    """Both arms run (the side-by-side one in two processes) and give one positive ratio; with
    one core there is nothing to compare, and the row says so."""
    common, _, _ = suite
    import bench_parallel

    tiny = common.Workload(grid=8, batch=1, stem=2, widths=(4,), warmup=1, repeats=0)
    res = bench_parallel.run(quick=True, device="cpu", w=tiny)
    (row,) = res["ratios"]
    assert row["status"] in ("met", "NOT MET") and row["value"] > 0 and math.isfinite(row["value"])
    m = res["measurements"]
    assert m["steps"] == 60 and m["in_turn_seconds"] > 0 and m["side_by_side_seconds"] > 0
    json.dumps(res, allow_nan=False)
    monkeypatch.setattr(bench_parallel.os, "cpu_count", lambda: 1)
    (row,) = bench_parallel.run(quick=True, device="cpu", w=tiny)["ratios"]
    assert row["status"] == "skipped" and "one core" in row["skipped"]


def test_rank_correlation_at_a_trivial_size(suite, tmp_path, monkeypatch):
    """The three evaluators score the same genotypes as the search does, every genotype is
    trained with each full seed, the proxies are compared with the seeds' mean and the
    yardstick with itself, and the rows are well-formed rank statistics."""
    import rank_correlation

    s = dataclasses.replace(rank_correlation.Settings().quick(), full_seeds=2)
    res = rank_correlation.run(quick=True, device="cpu", settings=s)
    m = res["measurements"]
    modes = ["inherit", "train", "finetune", "yardstick"]
    assert res["benchmark"] == "rank_correlation" and [r["mode"] for r in m["summary"]] == modes
    assert [r["mode"] for r in m["runs"]] == modes and all(r["genotypes"] == m["runs"][0]["genotypes"]
                                                          for r in m["runs"])
    for run in m["runs"]:
        first, second = run["trained_scores_per_seed"]
        assert run["trained_scores"] == pytest.approx([(a + b) / 2 for a, b in zip(first, second)])
        assert first != second  # another training seed, another result
        assert len(run["trained_scores"]) == len(run["genotypes"]) == 4
        assert all(math.isfinite(x) and x > 0 for x in run.get("cheap_scores", []) + first + second)
        assert 0 <= run["top_k_hits"] <= 3
    yardstick = m["runs"][-1]
    assert yardstick["kendall_tau"] == rank_correlation.rank_stats(first, second, 3)["kendall_tau"]
    assert m["runs"][0]["cheap_scores"] != m["runs"][2]["cheap_scores"]  # finetuning changed the scores
    assert len(res["ratios"]) == 12 and all(r["status"] in ("info", "error") for r in res["ratios"])
    json.dumps(res)

    # another proxy against the same yardstick: the earlier run's trainings are reused, none repeated
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"benchmarks": {"rank_correlation": res}}))
    fair = dataclasses.replace(s, modes=["inherit"], sampling="fair", trained=str(earlier))
    monkeypatch.setattr(rank_correlation, "trained_score", lambda *a, **k: pytest.fail("trained again"))
    again = rank_correlation.run(quick=True, device="cpu", settings=fair)["measurements"]["runs"]
    assert [r["mode"] for r in again] == ["inherit", "yardstick"] and again[0]["full_seconds"] == 0
    def by_genotype(run: dict, key: str) -> dict:  # the runs list their genotypes in the order of the proxy
        return {json.dumps(g, sort_keys=True): run[key][i] for i, g in enumerate(run["genotypes"])}

    assert by_genotype(again[0], "trained_scores") == by_genotype(m["runs"][0], "trained_scores")
    fair_cheap, uniform_cheap = by_genotype(again[0], "cheap_scores"), by_genotype(m["runs"][0], "cheap_scores")
    assert fair_cheap.keys() == uniform_cheap.keys() and fair_cheap != uniform_cheap  # another supernet
    with pytest.raises(NasDoseError, match=rf"^{earlier}: its full trainings were made with other settings \(full_st"):
        rank_correlation.run(quick=True, device="cpu", settings=dataclasses.replace(fair, full_steps=7))


def test_rank_correlation_on_a_resampled_data_set_scores_on_the_source_grid(suite, tmp_path, monkeypatch):
    """With --data a resampled import: the trained genotypes are scored as OpenKBP does, on the
    source grid, not on the coarse grid their checkpoint was chosen on."""
    common, _, _ = suite
    import rank_correlation

    from nas_dose.data.resample import downsample_patient
    from nas_dose.data.store import write_dataset
    from nas_dose.data.synth import synth_patients

    data = tmp_path / "coarse.h5"
    write_dataset(data, [downsample_patient(p, 2) for p in synth_patients(8, 16, seed=0)], source="synth16",
                  grid=8, total=8)
    official: list[float] = []
    real = common.official_scores

    def recorded(*args, **kwargs):
        scores = real(*args, **kwargs)
        official.append(scores.dose_score)
        return scores

    monkeypatch.setattr(common, "official_scores", recorded)
    s = dataclasses.replace(rank_correlation.Settings().quick(), data=str(data), modes=["train"], archs=3, top_k=1)
    (run,) = rank_correlation.run(quick=True, device="cpu", settings=s)["measurements"]["runs"]
    assert run["trained_scores"] == official and len(official) == 3
    assert all(math.isfinite(x) and x > 0 for x in official)


def test_the_yardstick_seed_fixes_the_initialization_whatever_the_random_state_before(suite, tmp_path):
    """Two trainings with one seed score alike even when the caller's random state differs (the
    network is built after seeding); another seed scores otherwise."""
    common, _, _ = suite
    from nas_dose.data.store import write_dataset
    from nas_dose.data.synth import synth_patients
    from nas_dose.models.unet3d import unet3d

    data = tmp_path / "tiny.h5"
    write_dataset(data, synth_patients(6, 16, seed=0), source="synth", grid=16, total=6)

    def score(seed: int, state: int) -> float:
        torch.manual_seed(state)  # whatever the caller did before
        return common.trained_score(lambda: unet3d(widths=(2, 4)), data, 1, 3, seed, 1e-2, "cpu", 1)

    first = score(1000, state=1)
    assert score(1000, state=2) == first and score(1001, state=1) != first


def test_rank_statistics(suite):
    import rank_correlation

    trained = [10, 20, 30, 40, 50, 60]
    same = rank_correlation.rank_stats([1, 2, 3, 4, 5, 6], trained, 3)
    assert same == pytest.approx({"kendall_tau": 1.0, "spearman_rho": 1.0, "top_k_hits": 3.0})
    reversed_ = rank_correlation.rank_stats([6, 5, 4, 3, 2, 1], trained, 3)
    assert reversed_ == pytest.approx({"kendall_tau": -1.0, "spearman_rho": -1.0, "top_k_hits": 0.0})
    # the best two agree, the third swaps with the fourth: 2 of the top 3
    assert rank_correlation.rank_stats([1, 2, 4, 3, 5, 6], trained, 3)["top_k_hits"] == 2.0
    assert rank_correlation.mean_sd([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert all(math.isnan(v) for v in rank_correlation.mean_sd([1.0, math.nan, 3.0]))


def test_preferences_benchmark_at_a_trivial_size(suite):
    """Both models train and are scored on every held-out plan; the rows are well-formed."""
    import bench_preferences

    quick = bench_preferences.Settings().quick()
    res = bench_preferences.run(quick=True, device="cpu", settings=replace(quick, latency_grids=[16, 32]))
    (run,) = res["measurements"]["runs"]
    assert run["plans"] == 10 and run["plain_dose_score"] > 0 and run["conditioned_dose_score"] > 0
    assert math.isnan(run["hi_rho"]) or -1 <= run["hi_rho"] <= 1
    assert set(res["measurements"]["latency_s"]) == {f"{m}_{g}_s" for m in ("conditioned", "plain", "student")
                                                     for g in (16, 32)}
    latency = [r for r in res["ratios"] if r["quantity"].startswith("latency")]
    assert len(latency) == 4 and all(r["quantity"].startswith("latency") for r in latency)
    # the 50 ms target is the student's at 32³ (the issue's), not the conditioned model's
    assert [r["target"] for r in latency] == ["", "", "", "≤ 50"]
    assert "student (U-Net widths [2, 4])" in latency[3]["quantity"]
    json.dumps(res)


def test_compare_strategies_puts_a_hand_designed_unet_of_no_more_flops_to_the_same_yardstick(suite, tmp_path):
    """`unet3d` is the widest reference U-Net within the FLOPs of the reference strategy's best
    genotype of the same seed, and the summary gives the paired differences to it and to random."""
    import compare_strategies as cs

    s = dataclasses.replace(cs.Settings().quick(), patients=8, stem=2, widths=[4, 8], seeds=1, supernet_steps=4,
                            candidates=3, final_epochs=1, final_steps=3, strategies=["random", "unet3d"],
                            reference="random")
    runs, summary = cs.compare(s, None, tmp_path, "cpu")
    searched, unet = runs
    bound = cs.genotype_flops(cs.Genotype(**searched["genotype"]), 16)
    assert unet["strategy"] == "unet3d" and unet["flops_bound"] == bound and 0 < unet["flops"] <= bound
    base = unet["widths"][0]
    assert unet["widths"] == [base, 2 * base, 4 * base]
    wider = cs.build_model(cs.ModelConfig(name="unet3d", kwargs={"widths": [base + 1, 2 * base + 2, 4 * base + 4]}))
    assert cs.count_flops(wider, (1, cs.IN_CHANNELS, 16, 16, 16)) > bound  # the widest that fits
    with pytest.raises(ValueError, match="no U-Net"):
        cs.hand_designed(1.0, 3, 16)
    rows = {r["strategy"]: r for r in summary}
    expected = 100 * (searched["final_score"] / unet["final_score"] - 1)
    assert rows["random"]["vs_unet3d_percent"] == (pytest.approx(expected), 0.0)
    assert rows["unet3d"]["vs_unet3d_percent"] is None and rows["unet3d"]["vs_random"] == (
        pytest.approx(unet["final_score"] - searched["final_score"]), 0.0)


def test_preferences_benchmark_scores_a_third_model_with_the_consistency_term(suite):
    import bench_preferences

    quick = bench_preferences.Settings().quick()
    res = bench_preferences.run(quick=True, device="cpu", settings=replace(quick, consistency=0.5))
    (run,) = res["measurements"]["runs"]
    assert run["consistency"]["plans"] == 10 and run["consistency"]["conditioned_dose_score"] > 0
    assert run["consistency"]["plain_dose_score"] == run["plain_dose_score"]  # against the same plain model
    names = [r["quantity"] for r in res["ratios"]]
    assert len(names) == 10 and names[5].startswith("with consistency 0.5: dose score improvement")
    assert names[1] == "plain model on 12 of its training phantoms: dose score (Gy)" and run["plain_fit_dose_score"] > 0


def test_preferences_benchmark_distils_a_conditioned_student_and_gives_the_plain_floor(suite, tmp_path):
    """`--distil`: the consistency model teaches a conditioned student of the student widths, and
    its twin trains alone; both are scored on every held-out plan. The floor is the error of each
    patient's per-voxel median plan, which no single dose per patient beats (e.g. any one plan)."""
    import bench_preferences
    import numpy as np

    from nas_dose.data.store import open_data
    from nas_dose.scores import dose_error

    s = replace(bench_preferences.Settings().quick(), consistency=0.5, distil=True, latency_grids=[16])
    res = bench_preferences.run(quick=True, device="cpu", settings=s)
    (run,) = res["measurements"]["runs"]
    for name in ("student", "baseline"):
        assert run[name]["plans"] == 10 and run[name]["plain_dose_score"] == run["plain_dose_score"]
        assert run[name]["conditioned_dose_score"] != run["consistency"]["conditioned_dose_score"]
    assert run["student"]["conditioned_dose_score"] != run["baseline"]["conditioned_dose_score"]
    names = [r["quantity"] for r in res["ratios"]]
    assert "conditioned student [2, 4], distilled: dose score improvement vs plain" in names
    assert "conditioned student [2, 4], no teacher (twin): dose score improvement vs plain" in names
    data, held = bench_preferences.make_data(s, tmp_path)
    runtime = bench_preferences.Runtime(bench_preferences.RuntimeConfig(device="cpu"))
    with open_data(data) as d:  # the fit of a network that predicts no dose: each plan's mean in the mask
        train = [(d.read(pid), d.read_plans(pid).doses) for pid in d.ids("train")]
    assert len(train) == 3 and bench_preferences.fit_score(s, lambda x: torch.zeros_like(x[:, :1]), data, runtime) \
        == pytest.approx(np.mean([dose_error(np.zeros_like(dose), dose, p.possible_dose_mask)
                                  for p, doses in train for dose in doses]))
    one_plan = []
    with open_data(held) as d:
        for pid in d.ids()[:s.held_out]:
            p, doses = d.read(pid), d.read_plans(pid).doses
            one_plan.append(np.mean([dose_error(doses[0], dose, p.possible_dose_mask) for dose in doses]))
    assert 0 < run["floor_dose_score"] < np.mean(one_plan) < run["plain_dose_score"]



def test_preferences_benchmark_compares_officially_on_a_resampled_data_set(suite, tmp_path, monkeypatch):
    """`--openkbp`: both models trained by `nasdose train` on a resampled data set, the conditioned
    one scored at each patient's own measured preferences, as `predict --preference measured` does."""
    import bench_preferences

    from nas_dose.data.resample import downsample_patient
    from nas_dose.data.store import open_data, write_dataset
    from nas_dose.data.synth import synth_patients
    from nas_dose.inference import load_at_measured, load_predictor, official_scores
    from nas_dose.runtime import Runtime, RuntimeConfig

    data = tmp_path / "coarse16.h5"
    write_dataset(data, (downsample_patient(p, 2) for p in synth_patients(5, 32, seed=0)), source="synth32", grid=16)
    runtime = Runtime(RuntimeConfig(device="cpu", threads=1))
    expected, train = {}, bench_preferences.nasdose_train

    def scored(config, inputs, out):  # what the run folder scores, read before it is deleted
        result = train(config, inputs, out)
        load = load_at_measured if config.model.conditioning else load_predictor
        with open_data(inputs.data) as d:
            expected[out.name] = official_scores(load(out, runtime), d, d.ids("validation"), runtime)
        return result

    monkeypatch.setattr(bench_preferences, "nasdose_train", scored)
    settings = replace(bench_preferences.Settings().quick(), latency_grids=[16], openkbp=str(data))
    res = bench_preferences.run(quick=True, device="cpu", settings=settings)
    (run,) = res["measurements"]["runs"]
    k, plain, conditioned = run["openkbp"], expected["plain_seed0"], expected["conditioned_seed0"]
    assert (k["plain_dose_score"], k["plain_dvh_score"]) == (plain.dose_score, plain.dvh_score)
    assert (k["conditioned_dose_score"], k["conditioned_dvh_score"]) == (conditioned.dose_score, conditioned.dvh_score)
    rows = [r for r in res["ratios"] if r["quantity"].startswith(str(data))]
    assert [r["quantity"].split(": ")[1] for r in rows] == [
        "official dose score, conditioned at each patient's measured preferences ÷ plain",
        "official DVH score, conditioned at each patient's measured preferences ÷ plain"]
    assert rows[0]["value"] == pytest.approx(conditioned.dose_score / plain.dose_score) and rows[0]["target"] == "≤ 1"
    assert rows[1]["value"] == pytest.approx(conditioned.dvh_score / plain.dvh_score)
    same_grid = tmp_path / "synth16.h5"
    write_dataset(same_grid, synth_patients(5, 16, seed=0), source="synth", grid=16)
    with pytest.raises(bench_preferences.NasDoseError, match="not a resampled data set"):
        bench_preferences.official(replace(settings, openkbp=str(same_grid)), 0, "cpu", tmp_path / "runs")


def test_a_settings_switch_is_a_flag_and_lists_take_several_values(suite):
    """A bool field of a benchmark's Settings is a switch (`--distil`, no value), not a word that
    `bool()` would read as True whatever it says."""
    import argparse

    import bench_preferences

    import common

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int)
    common.add_settings_arguments(p, bench_preferences.Settings())
    on = common.settings_option(p.parse_args(["--distil", "--seeds", "0", "2"]), bench_preferences.Settings())
    assert on["settings"].distil is True and on["settings"].seeds == [0, 2]
    assert common.settings_option(p.parse_args([]), bench_preferences.Settings())["settings"].distil is False
    with pytest.raises(SystemExit):
        p.parse_args(["--distil", "False"])


def test_prior_benchmark_at_a_trivial_size(suite):
    """Five arms per seed, each scored against every held-out plan; the prior arms carry their
    stage I's reconstruction score, and the gains are paired against the latent net from scratch."""
    import bench_prior

    s = replace(bench_prior.Settings().quick(), freeze=True)
    res = bench_prior.run(quick=True, device="cpu", settings=s)
    (run,) = res["measurements"]["runs"]
    arms = list(bench_prior.arms(s))
    assert arms[1] == bench_prior.SCRATCH and all(run[a]["plans"] == 10 for a in arms)
    assert [("prior_reconstruction_dose_score" in run[a]) for a in arms] == [False, False, True, True, False]
    assert run["latent, prior"]["prior_reconstruction_dose_score"] > 0
    details = [r["detail"] for r in res["ratios"]]
    assert len(details) == 5 and "vs latent, scratch" not in details[1]
    assert all("better in" in d for i, d in enumerate(details) if i != 1)
    json.dumps(res)


def test_conditioned_search_benchmark_at_a_trivial_size(suite):
    """Both arms end in a conditioned ensemble scored against every held-out plan. At the quick
    size each pool is every genotype the search drew (budget = pool size) from one seed, so the
    pools are the same, and with the same member seeds so are the ensembles: they tie exactly."""
    import bench_conditioned_search as bench

    res = bench.run(quick=True, device="cpu")
    (run,) = res["measurements"]["runs"]
    scores = [run[arm]["conditioned_dose_score"] for arm in bench.ARMS]
    assert all(run[arm]["plans"] == 6 for arm in bench.ARMS) and all(x > 0 for x in scores)
    assert run["same_pool"] and scores[0] == scores[1] and res["ratios"][2]["value"] == 0
    json.dumps(res)


def test_loader_benchmark_at_a_trivial_size(suite):
    common, _, _ = suite
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_loader
    finally:
        sys.path.remove(str(BENCHMARKS))
    # the rotation row's baseline is the same rotation as augment's, or the row compares nothing
    import nas_dose.data.augment as augment_module

    vol = torch.rand(9, 7, 5, generator=torch.Generator().manual_seed(0)).numpy()
    for order in (0, 1):
        assert abs(bench_loader.ndimage_rotate(vol, 40.0, order, 0.0)
                   - augment_module._rotate(vol, 40.0, order, 0.0)).max() < 1e-6
    assert bench_loader.worker_counts(torch.device("cpu")) == (0, 1, 2)
    tiny = common.Workload(grid=16, batch=1, stem=2, widths=(4, 8, 16), warmup=1, repeats=1)
    res = bench_loader.run(quick=True, device="cpu", w=tiny)
    values = {r["quantity"]: r["value"] for r in res["ratios"]}
    assert len(values) == 5 and all(v is not None and v > 0 and math.isfinite(v) for v in values.values())
    assert any(q.startswith("rotated patient reads/s") for q in values)
    assert augment_module._rotate is not bench_loader.ndimage_rotate  # the baseline was put back


def test_preferences_benchmark_with_beam_plates(suite):
    """Every model of the benchmark takes the beam plate as an eleventh channel."""
    import bench_preferences

    quick = replace(bench_preferences.Settings().quick(), beam_plates=True, latency_grids=[16])
    res = bench_preferences.run(quick=True, device="cpu", settings=quick)
    (run,) = res["measurements"]["runs"]
    assert run["plans"] == 10 and run["plain_dose_score"] > 0 and run["conditioned_dose_score"] > 0
    assert "beam plates" in res["notes"][0]


def test_preference_ceiling_knows_the_preference_floor(suite, tmp_path):
    """With every plan parameter known, the plain floor is bench_preferences's floor of the same
    held-out phantoms and the ceiling 1; hiding the plan leaves a floor for both models."""
    import bench_preference_ceiling
    import bench_preferences

    s = bench_preference_ceiling.Settings(patients=2, plans=3, draws=3)
    summary = bench_preference_ceiling.run(quick=False, settings=s)["measurements"]["summary"]
    held = bench_preferences.HeldOutPlans(held_out=2, plans=3, grid=16)
    _, held_path = bench_preferences.make_data(held, tmp_path)
    assert summary["known"]["plain_floor"] == pytest.approx(bench_preferences.plain_floor(held, held_path), rel=1e-4)
    assert summary["known"]["ceiling"] == 1.0
    for state in ("hidden", "beams", "plates"):
        assert 0 < summary[state]["conditioned_floor"] < summary[state]["plain_floor"]
    assert summary["hidden"]["plain_floor"] > summary["plates"]["plain_floor"] > summary["known"]["plain_floor"]
