"""Kill nasdose commands at random points and check that re-running them ends where an
uninterrupted twin ends (issue 16). Not a timing benchmark, and not in the test suite: it
starts dozens of processes.

For `train` (run with --resume until it exits 0) and `data import` (run again until it exits
0), each of N trials: the command is started and killed with SIGKILL after a random delay, as
often as a random draw says (0-3 times), then run to its end. Checked per trial: the final
artifacts equal the twin's (every weight, optimizer state and log line of the training; every
array and attribute of the data set), and no temporary or lock file is left. Then M races:
two `nasdose train` started at once on the same new folder; exactly one may write it.

    python benchmarks/chaos.py --trials 5 --races 3
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch

TRAIN = ["model.kwargs.widths=[4, 8]", "epochs=4", "data.batch_size=1", "data.augment.enabled=false",
         "checkpoint_every=1", "runtime.device=cpu", "runtime.threads=1", "--quiet"]
LEFT_OVER = ("*.tmp", ".*.tmp", ".nasdose.lock", ".*.lock", ".submission.partial")


def nasdose(*args: Any) -> list[str]:
    return [sys.executable, "-m", "nas_dose", *(str(a) for a in args)]


def run_killed(argv: list[str], kills: int, span: float, rng: random.Random,
               leftovers: Callable[[], list[str]]) -> tuple[int, int, int]:
    """Start `argv` and SIGKILL it after a random delay in (0, span), `kills` times, then let it
    run to its end. Returns (kills that hit a running process, temporaries the kills left, final
    exit status)."""
    hits = orphans = 0
    for _ in range(kills):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, span))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            hits += 1
        proc.wait()
        orphans += sum(not f.endswith(".lock") for f in leftovers())
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        print(done.stderr.strip(), file=sys.stderr)
    return hits, orphans, done.returncode


def left_over(folder: Path) -> list[str]:
    """Temporary and lock files under `folder`."""
    return sorted({str(p.relative_to(folder)) for pattern in LEFT_OVER for p in folder.rglob(pattern)})


def same_training(run: Path, twin: Path) -> bool:
    """Same weights, optimizer state and best model in both checkpoints, the same log (without
    wall times)."""
    for name in ("checkpoints/last.pt", "best.pt"):
        a, b = (torch.load(r / name, weights_only=True) for r in (run, twin))
        for key in ("model", "best_model"):
            if key in b and any(not torch.equal(a[key][k], v) for k, v in b[key].items()):
                return False
        if name.endswith("last.pt") and repr(a["optimizer"]["state"]) != repr(b["optimizer"]["state"]):
            return False

    def log(r: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (r / "log.jsonl").read_text().splitlines()]

    return log(run) == log(twin)


def same_data(a: Path, b: Path) -> bool:
    """Every array and attribute equal (the nasdose version and source path aside)."""

    def content(path: Path) -> dict[str, Any]:
        items: dict[str, Any] = {}
        with h5py.File(path) as f:
            f.visititems(lambda name, obj: items.__setitem__(name, obj[()] if isinstance(obj, h5py.Dataset) else None))
            for name in ["", *items]:
                for key, value in (f[name] if name else f).attrs.items():
                    items[f"{name}@{key}"] = value
        return items

    x, y = content(a), content(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="killed runs per command (default %(default)s)")
    parser.add_argument("--races", type=int, default=3, help="concurrent trainings (default %(default)s)")
    parser.add_argument("--patients", type=int, default=40, help="patients of the imported tree (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="nasdose-chaos-"))
    try:
        data, tree = root / "d.h5", root / "tree"
        subprocess.run(nasdose("data", "synth", data, "--patients", 8, "--grid", 16, "-q"), check=True)
        tree.mkdir()
        from nas_dose.data.synth import synth_patients

        for p in synth_patients(args.patients, 32, seed=0):
            split = tree / p.attrs["split"]
            split.mkdir(exist_ok=True)
            np.savez_compressed(split / f"{p.id}.npz", ct=p.ct, dose=p.dose, possible_dose_mask=p.possible_dose_mask,
                                voxel_dimensions_mm=np.array(p.voxel_mm), **p.structures)
        train_span = timed(nasdose("train", "--data", data, "--out", root / "twin", *TRAIN))
        import_span = timed(nasdose("data", "import", tree, root / "twin.h5", "--grid", 16, "-q"))
        print(f"uninterrupted: train {train_span:.1f} s, import {import_span:.1f} s")
        rows = []
        for kind, span in (("train", train_span), ("import", import_span)):
            killed = orphaned = equal = clean = 0
            for trial in range(args.trials):
                out = root / f"{kind}{trial}"
                argv = (nasdose("train", "--data", data, "--out", out, "--resume", *TRAIN) if kind == "train"
                        else nasdose("data", "import", tree, out.with_suffix(".h5"), "--grid", 16, "-q"))

                def leftovers() -> list[str]:
                    if kind == "train":
                        return left_over(out) if out.exists() else []
                    return [f for f in left_over(root) if f.startswith(f".{out.name}.h5")]

                hits, orphans, code = run_killed(argv, rng.randint(1, 3), span, rng, leftovers)
                killed, orphaned = killed + hits, orphaned + orphans
                equal += code == 0 and (same_training(out, root / "twin") if kind == "train"
                                        else same_data(out.with_suffix(".h5"), root / "twin.h5"))
                clean += not leftovers()
            rows.append((kind, args.trials, killed, orphaned, equal, clean))
        refused = other = 0
        for race in range(args.races):
            out = root / f"race{race}"
            procs = [subprocess.Popen(nasdose("train", "--data", data, "--out", out, *TRAIN),
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
            results = [(p.wait(), p.stderr.read()) for p in procs]
            winners = sum(code == 0 for code, _ in results)
            refused += winners == 1 and any("in use by another nasdose process" in err for _, err in results)
            other += winners != 1
        print(f"{'command':<8}{'trials':>8}{'kills':>8}{'temporaries left by kills':>27}{'equal twin':>12}"
              f"{'nothing left':>14}")
        for kind, trials, killed, orphaned, equal, clean in rows:
            print(f"{kind:<8}{trials:>8}{killed:>8}{orphaned:>27}{equal:>12}{clean:>14}")
        print(f"races: {args.races}, one writer and the other refused as 'in use': {refused}, "
              f"not exactly one writer: {other}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
