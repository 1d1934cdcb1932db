"""Run the whole benchmark suite: one table of ratios, one JSON file with every measurement, the
machine, torch version, date and command.

    python benchmarks/run_suite.py --quick --out results.json
    python benchmarks/run_suite.py --only throughput,loader --device cuda

Every benchmark is a module here with `run(quick, device="auto") -> dict`. Benchmarks written by
others (search, strategies, distillation, ensemble) run when their file exists and has a
`run(quick)` entry point; otherwise the table marks them missing. A benchmark that fails is
marked `error` (with its message) and the others still run; the exit status is then 1.
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from nas_dose.errors import NasDoseError
from nas_dose.io import save_json
from nas_dose.runtime import resolve_device

from common import (
    clear_device_cache,
    describe_machine,
    format_table,
    machine,
    parse_args,
    run_arguments,
    table_rows,
    torch_state_restored,
)

HERE = Path(__file__).resolve().parent
# (name in the table, module in benchmarks/), in the order they run.
SUITE: tuple[tuple[str, str], ...] = (
    ("throughput", "bench_throughput"), ("kernels", "bench_kernels"), ("runtime", "bench_runtime"),
    ("loader", "bench_loader"), ("search", "bench_search"), ("strategies", "compare_strategies"),
    ("distill", "bench_distill"), ("parallel", "bench_parallel"),
)


def run_one(module_name: str, quick: bool, device: str, repeats: int | None = None) -> dict[str, Any]:
    """{status: ran | missing | error, seconds, result or reason} of one benchmark module."""
    if not (HERE / f"{module_name}.py").is_file():
        return {"status": "missing", "reason": f"benchmarks/{module_name}.py does not exist yet"}
    start = time.perf_counter()
    try:
        run = getattr(importlib.import_module(module_name), "run", None)
        if not callable(run):
            return {"status": "missing", "reason": f"benchmarks/{module_name}.py has no run(quick) entry point"}
        with torch_state_restored():
            res = run(**run_arguments(run, quick, device, repeats))
    except Exception as e:  # one broken benchmark must not hide the others' results
        traceback.print_exc()
        return {"status": "error", "reason": f"{type(e).__name__}: {e}".splitlines()[0],
                "seconds": time.perf_counter() - start}
    return {"status": "ran", "seconds": time.perf_counter() - start, "result": res}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], argv, add=lambda p: p.add_argument(
        "--only", default=None, metavar="NAMES",
        help=f"comma-separated subset of: {', '.join(name for name, _ in SUITE)}"))
    try:
        device = resolve_device(args.device)
    except NasDoseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    chosen = SUITE
    if args.only is not None:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {name for name, _ in SUITE})
        if unknown:
            print(f"error: --only: unknown benchmark(s) {', '.join(unknown)}", file=sys.stderr)
            return 1
        chosen = tuple(entry for entry in SUITE if entry[0] in names)
    info = machine(device)
    outcomes: dict[str, dict[str, Any]] = {}
    for name, module in chosen:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        outcomes[name] = run_one(module, args.quick, args.device, args.repeats)
        clear_device_cache(device)
    lines: list[list[str]] = []
    for name, outcome in outcomes.items():
        if outcome["status"] == "ran":
            lines += table_rows(name, outcome["result"])
        else:
            lines.append([name, "(not run)", "", "", outcome["status"], outcome["reason"]])
    print(describe_machine(info))
    print(format_table(lines))
    for name, outcome in outcomes.items():
        seconds = f"{outcome['seconds']:.0f} s" if "seconds" in outcome else "-"
        notes = outcome.get("result", {}).get("notes", []) if outcome["status"] == "ran" else []
        print(f"{name} ({seconds})" + "".join(f"\n  note: {n}" for n in notes))
    if args.out is not None:
        save_json(args.out, {"machine": info, "quick": args.quick, "repeats": args.repeats, "benchmarks": outcomes})
        print(f"wrote {args.out}")
    return 1 if any(o["status"] == "error" for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
