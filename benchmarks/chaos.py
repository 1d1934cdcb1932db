"""Kill nasdose commands at random points and check that re-running them ends where an
uninterrupted twin ends (issue 16). Not a timing benchmark, and not in the test suite: it
starts dozens of processes.

For `train`, `data import`, `search`, `ensemble` and `distill` (--commands chooses), each of N
trials: the command is started and killed with SIGKILL after a random delay, as often as a
random draw says (1-3 times), then run to its end (with --resume, which a search takes only
once its folder holds config.yaml). The search is a tiny regularized evolution whose supernet
takes 250 steps, checkpointed every 100 to supernet-<key>.partial.pt, so kills land in it too;
the ensemble trains the twin search's pool (one epoch, parallel=1); the distillation has the
twin ensemble teach a unet3d:widths=2,4 student (one epoch). Checked per trial: the final
artifacts equal the twin's (weights, optimizer states, logs, pool.yaml, ensemble.yaml,
metrics.json and every array and attribute of a data set, wall times aside), the first
differing key named when not, and no temporary or lock file is left. Then M races: two
`nasdose train` started at once on the same new folder; exactly one may write it.

    python benchmarks/chaos.py --trials 5 --races 3
    python benchmarks/chaos.py --trials 2 --races 0 --commands search,ensemble,distill
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
import yaml

TRAIN = ["model.kwargs.widths=[4, 8]", "epochs=4", "data.batch_size=1", "data.augment.enabled=false",
         "checkpoint_every=1", "runtime.device=cpu", "runtime.threads=1", "--quiet"]
# a tiny regularized evolution (configs/pipeline_quick.yaml's search) whose supernet takes 250 steps,
# so that it is checkpointed (every 100 steps, to supernet-<key>.partial.pt) and killed in between
SEARCH = ["space=lenas", "strategy=evolution", "pool_size=2", "diversity.mode=pool", "diversity.lam=0.5", "seed=0",
          "macro={stem: 2, widths: [4, 8]}", "options={budget: 4, population: 3, sample: 2, members: 2, "
          "evaluator: {supernet_steps: 250, batch_size: 1}}", "runtime.device=cpu", "runtime.threads=1"]
BUDGET = ["train.epochs=1", "train.data.batch_size=1", "train.data.augment.enabled=false", "train.checkpoint_every=1",
          "seed=0", "runtime.device=cpu", "runtime.threads=1"]
STUDENT = ["--student", "unet3d:widths=2,4", *BUDGET, "latency.size=16", "latency.runs=1"]
LEFT_OVER = ("*.tmp", ".*.tmp", ".nasdose.lock", ".*.lock", ".submission.partial", "*.partial.pt")
KEPT = (".lock", ".partial.pt")  # what a kill may leave: a stale lock, a supernet's checkpoint
# what differs between two uninterrupted runs: wall times, latencies, memory, the time of a log line
WALL = {"seconds", "seconds_per_epoch", "time", "peak_memory", "cpu_latency_s", "gpu_latency_s", "latency"}


def nasdose(*args: Any) -> list[str]:
    return [sys.executable, "-m", "nas_dose", *(str(a) for a in args)]


@dataclass
class Command:
    """A command killed and re-run: `argv(out)` writes `out` (a folder, or a file with `suffix`),
    its `artifacts` (globs under the folder; none: the file itself) must equal the twin's;
    `needs`: the commands whose twins' outputs it reads."""
    argv: Callable[[Path], list[str]]
    artifacts: tuple[str, ...] = ()
    suffix: str = ""
    needs: tuple[str, ...] = ()


def commands(root: Path) -> dict[str, Command]:
    data, tree = root / "d.h5", root / "tree"

    def search(out: Path) -> list[str]:  # --resume needs the folder's config.yaml
        return nasdose("search", "-q", "--data", data, "--out", out,
                       *(["--resume"] if (out / "config.yaml").exists() else []), *SEARCH)

    return {
        "train": Command(lambda out: nasdose("train", "--data", data, "--out", out, "--resume", *TRAIN),
                         ("checkpoints/last.pt", "best.pt", "log.jsonl")),
        # an import is redone whole, so its re-run replaces what a run that finished left
        "import": Command(lambda out: nasdose("data", "import", tree, out, "--grid", 16, "--force", "-q"),
                          suffix=".h5"),
        "search": Command(search, ("pool.yaml", "search_log.jsonl", "genotypes/*.yaml", "state/**/*.pt")),
        "ensemble": Command(lambda out: nasdose("ensemble", "-q", twin(root, "search") / "pool.yaml", "--data", data,
                                                "--out", out, "--resume", *BUDGET, "parallel=1"),
                            ("ensemble.yaml", "metrics.json", "validation.h5", "members/*/best.pt",
                             "members/*/checkpoints/last.pt", "members/*/log.jsonl", "members/*/metrics.json"),
                            needs=("search",)),
        "distill": Command(lambda out: nasdose("distill", "-q", twin(root, "ensemble") / "ensemble.yaml", "--data",
                                               data, "--out", out, "--resume", *STUDENT),
                           ("metrics.json", "teacher.h5", "student/best.pt", "student/checkpoints/last.pt",
                            "student/log.jsonl", "student/metrics.json", "baseline/best.pt"),
                           needs=("search", "ensemble")),
    }


NAMES = ("train", "import", "search", "ensemble", "distill")


def twin(root: Path, name: str) -> Path:
    return root / f"twin-{name}"


def run_killed(argv: Callable[[], list[str]], kills: int, span: float, rng: random.Random,
               leftovers: Callable[[], list[str]]) -> tuple[int, int, int, int]:
    """Start `argv()` and SIGKILL it after a random delay in (0, span), `kills` times, then let it
    run to its end. Returns (kills that hit a running process, temporaries the kills left, kills
    after which a *.partial.pt checkpoint was there to resume from, final exit status)."""
    hits = orphans = partial = 0
    for _ in range(kills):
        proc = subprocess.Popen(argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, span))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            hits += 1
        proc.wait()
        orphans += sum(not f.endswith(KEPT) for f in leftovers())
        partial += any(f.endswith(".partial.pt") for f in leftovers())
    done = subprocess.run(argv(), capture_output=True, text=True)
    if done.returncode:
        print(done.stderr.strip(), file=sys.stderr)
    return hits, orphans, partial, done.returncode


def left_over(out: Path) -> list[str]:
    """Temporary and lock files of the output `out` (a folder or a file): under it, and beside it
    named after it."""
    beside = [p for p in out.parent.glob(f".{out.name}.*") if any(p.match(pattern) for pattern in LEFT_OVER)]
    under = [p for pattern in LEFT_OVER for p in out.rglob(pattern)] if out.is_dir() else []
    return sorted({str(p.relative_to(out.parent)) for p in beside + under})


def h5_content(path: Path) -> dict[str, Any]:
    """Every array and attribute of an HDF5 file."""
    items: dict[str, Any] = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: items.__setitem__(name, obj[()] if isinstance(obj, h5py.Dataset) else None))
        for name in ["", *items]:
            for key, value in (f[name] if name else f).attrs.items():
                items[f"{name}@{key}"] = value
    return items


def load(path: Path) -> Any:
    if path.suffix == ".pt":
        return torch.load(path, weights_only=False, map_location="cpu")
    if path.suffix == ".h5":
        return h5_content(path)
    if path.suffix == ".yaml":
        return yaml.safe_load(path.read_text())
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


def scrub(value: Any, out: Path) -> Any:
    """`value` with the output's path in its strings written <out> (a run's own path differs from
    its twin's)."""
    if isinstance(value, dict):
        return {k: scrub(v, out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, out) for v in value]
    return value.replace(str(out), "<out>") if isinstance(value, str) else value


def mismatch(a: Any, b: Any, where: str = "") -> str | None:
    """Where `a` and `b` first differ (a key path, "" for the whole), None when equal: tensors and
    arrays exactly, wall times (WALL keys) aside."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = a.keys() - WALL
        if keys != b.keys() - WALL:
            return f"{where}{{{', '.join(sorted(map(str, keys ^ (b.keys() - WALL))))}}}"
        return next((m for k in sorted(keys, key=str) if (m := mismatch(a[k], b[k], f"{where}/{k}")) is not None), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}[{len(a)} vs {len(b)}]"
        return next((m for i, (x, y) in enumerate(zip(a, b)) if (m := mismatch(x, y, f"{where}[{i}]")) is not None),
                    None)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        equal = a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        equal = np.array_equal(a, b)
    else:
        equal = type(a) is type(b) and bool(a == b or a != a and b != b)  # NaN equals NaN
    return None if equal else where


def differences(run: Path, twin_out: Path, artifacts: tuple[str, ...]) -> list[str]:
    """The artifacts of `run` that differ from (or lack) the twin's, each with the key where it
    first differs: files matching `artifacts` under the folders, or the file itself."""
    pairs = ([(run.name, run, twin_out)] if not artifacts else
             [(n, run / n, twin_out / n) for n in sorted({str(p.relative_to(twin_out)) for pattern in artifacts
                                                           for p in twin_out.glob(pattern)})])
    found = []
    for name, mine, theirs in pairs:
        where = (mismatch(scrub(load(mine), run), scrub(load(theirs), twin_out)) if mine.exists()
                 else "(missing)")
        if where is not None:
            found.append(f"{name}{where and f' {where}'}")
    return found


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="killed runs per command (default %(default)s)")
    parser.add_argument("--races", type=int, default=3, help="concurrent trainings (default %(default)s)")
    parser.add_argument("--patients", type=int, default=40, help="patients of the imported tree (default %(default)s)")
    parser.add_argument("--commands", default=",".join(NAMES),
                        help="commands to kill, comma-separated, among %(default)s (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chosen = [c.strip() for c in args.commands.split(",") if c.strip()]
    if unknown := set(chosen) - set(NAMES):
        parser.error(f"--commands: unknown {', '.join(sorted(unknown))}; choose among {', '.join(NAMES)}")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="nasdose-chaos-"))
    try:
        data, tree = root / "d.h5", root / "tree"
        subprocess.run(nasdose("data", "synth", data, "--patients", 8, "--grid", 16, "-q"), check=True)
        if "import" in chosen:
            tree.mkdir()
            from nas_dose.data.synth import synth_patients

            for p in synth_patients(args.patients, 32, seed=0):
                split = tree / p.attrs["split"]
                split.mkdir(exist_ok=True)
                np.savez_compressed(split / f"{p.id}.npz", ct=p.ct, dose=p.dose,
                                    possible_dose_mask=p.possible_dose_mask,
                                    voxel_dimensions_mm=np.array(p.voxel_mm), **p.structures)
        table = commands(root)
        spans: dict[str, float] = {}
        for name in NAMES:  # the twins, those the chosen commands read first
            if name in chosen or any(name in table[c].needs for c in chosen):
                spans[name] = timed(table[name].argv(twin(root, name).with_suffix(table[name].suffix)))
        print("uninterrupted: " + ", ".join(f"{name} {span:.1f} s" for name, span in spans.items()))
        rows, failures = [], []
        for name in (n for n in NAMES if n in chosen):
            command = table[name]
            killed = orphaned = partial = equal = clean = 0
            for trial in range(args.trials):
                out = root / f"{name}{trial}{command.suffix}"
                hits, orphans, partials, code = run_killed(lambda: command.argv(out), rng.randint(1, 3),
                                                           spans[name], rng, lambda: left_over(out))
                killed, orphaned, partial = killed + hits, orphaned + orphans, partial + partials
                differ = (differences(out, twin(root, name).with_suffix(command.suffix), command.artifacts)
                          if code == 0 else [f"exit status {code}"])
                equal += not differ
                clean += not left_over(out)
                if differ or left_over(out):
                    failures.append(f"{name} trial {trial}: differs from the twin: {', '.join(differ) or '-'}; "
                                    f"left: {', '.join(left_over(out)) or '-'}")
            rows.append((name, args.trials, killed, orphaned, partial, equal, clean))
        refused = other = 0
        for race in range(args.races if "train" in chosen else 0):
            out = root / f"race{race}"
            procs = [subprocess.Popen(nasdose("train", "--data", data, "--out", out, *TRAIN),
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
            results = [(p.wait(), p.stderr.read()) for p in procs]
            winners = sum(code == 0 for code, _ in results)
            refused += winners == 1 and any("in use by another nasdose process" in err for _, err in results)
            other += winners != 1
        print(f"{'command':<10}{'trials':>8}{'kills':>8}{'temporaries left by kills':>27}"
              f"{'kills leaving a *.partial.pt':>30}{'equal twin':>12}{'nothing left':>14}")
        for name, trials, killed, orphaned, partial, equal, clean in rows:
            print(f"{name:<10}{trials:>8}{killed:>8}{orphaned:>27}{partial:>30}{equal:>12}{clean:>14}")
        for failure in failures:
            print(failure)
        if "train" in chosen:
            print(f"races: {args.races}, one writer and the other refused as 'in use': {refused}, "
                  f"not exactly one writer: {other}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
