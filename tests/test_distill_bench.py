"""Smoke test of benchmarks/bench_distill.py at a trivial size: it runs both comparisons and
returns well-formed, positive ratios (no timing is asserted)."""
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_distill

        import common
        yield common, bench_distill
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_distill_benchmark_at_a_trivial_size(bench):
    common, bench_distill = bench
    tiny = common.Workload(grid=16, batch=1, stem=2, widths=(4, 8), warmup=1, repeats=1)
    res = bench_distill.run(quick=True, device="cpu", w=tiny)
    assert res["benchmark"] == "distill" and res["device"] == "cpu" and res["workload"]["grid"] == 16
    step, latency = res["ratios"]
    assert "distillation step" in step["quantity"] and step["target"] == "≤ 1.3"
    assert "ensemble (3 members) ÷ student" in latency["quantity"] and latency["status"] == "info"
    for r in res["ratios"]:
        assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] > 0
    assert len(res["measurements"]["step_seconds"]["plain"]) == len(res["measurements"]["step_seconds"]["distill"]) == 1
    params = res["measurements"]["params"]
    assert 0.1 < params["student"] * 3 / params["ensemble"] < 0.5  # width 0.5: about a quarter of a member
    json.dumps(res, allow_nan=False)


def test_the_ablation_gives_concurrent_mode_the_two_stage_compute(bench):
    """Members of 4 FLOPs, a student of 1, 2 members, 10 patients cached, 120 steps of batch 2:
    two-stage spends 2·3·4·120·2 + 2·4·10 + 3·1·120·2 = 6560 (+ 4·120·2 = 960 for the online hint
    member); a concurrent step 2·3·4·2 + 3·1·2 = 54."""
    _, bench_distill = bench
    assert bench_distill.ABLATION_STEPS == 120 and bench_distill.ABLATION.batch == 2
    assert bench_distill.equal_compute_steps(4, 1, 2, 10, hints=False) == (round(6560 / 54), 6560)
    assert bench_distill.equal_compute_steps(4, 1, 2, 10, hints=True) == (round(7520 / 54), 7520)
