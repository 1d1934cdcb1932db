"""Smoke test of the benchmark suite: it imports, runs one benchmark at a trivial size and
returns well-formed, positive, finite ratios. No timing is asserted (timings are the suite's
output, not a property of the code)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_throughput
        import common
        import run_suite
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
