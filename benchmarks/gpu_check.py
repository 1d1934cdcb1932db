"""The Python half of benchmarks/gpu_prepare.sh and gpu_check.sh (issue 21: the GPU measurements,
run once on a device machine that gets only a 64 MiB copy of the working tree and no network).

    python benchmarks/gpu_check.py data --src NPZ128 --out .gpu/openkbp.h5 --root .     (prepare)
    python benchmarks/gpu_check.py config configs/openkbp_gpu.yaml TRAIN.yaml            (device)
    python benchmarks/gpu_check.py epochs PROBE_RUN --wall S --avail S --most E          (device)
    python benchmarks/gpu_check.py pipeline configs/openkbp_gpu.yaml SMOKE.yaml [--dry]     (device)
    python benchmarks/gpu_check.py summary --out OUT --work WORK --data DATA.h5 --wall S (device)

`data` imports (nasdose data import's code) every validation patient and as many training
patients, in natural order, as fit the size left under the limit; `epochs` says how many epochs
of the probe's length fit the seconds left; `pipeline` writes the recipe's search, ensemble and
distill stages at its sizes with the fewest steps (a smoke run of every stage's GPU path);
`summary` gathers the figures into summary.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from nas_dose.config import apply_overrides
from nas_dose.io import load_yaml, save_json, save_yaml

MIB = 2 ** 20
# What travels to the device in all (tracked and untracked-not-ignored files and the carry folder),
# and what is kept free of it for the repository's growth until the device run.
LIMIT, MARGIN = 64 * MIB, 8 * MIB
# A first guess of an imported patient's size over its npz file's (1.18 measured on 56 patients); the import
# is redone with fewer training patients when the data set comes out larger than its budget.
H5_PER_NPZ = 1.2
# The part of the seconds left that the epoch count plans to fill (the rest absorbs the noise).
SAFETY = 0.9
# The pipeline smoke run: the recipe's networks, grid and runtime, the fewest steps that still run
# every stage (a supernet, scored candidates, a pool of two trained into an ensemble, a student).
SMOKE_STAGES = ("search", "ensemble", "distill")
SMOKE = ["stages=[search, ensemble, distill]", "epochs=1", "search.pool_size=2", "search.options.budget=3",
         "search.options.population=2", "search.options.sample=2", "search.options.evaluator.supernet_steps=10"]
# Dry (tests): the same on the CPU at 16³, with tiny networks.
DRY = ["grid=16", "search.macro.stem=2", "search.macro.widths=[4, 8]", "distill.student=unet3d:widths=2,4",
       *(f"{stage}.runtime={{device: cpu, threads: 1}}" for stage in SMOKE_STAGES)]


def travel_bytes(root: Path) -> int:
    """Bytes of the files that travel with the working tree: tracked and untracked-not-ignored."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sum((root / name).lstat().st_size for name in listed if name and os.path.lexists(root / name))


def folder_bytes(folder: Path, leave_out: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p != leave_out) if folder.is_dir() else 0


def patients(src: Path, split: str, most: int | None) -> list[Path]:
    from nas_dose.data.openkbp import natural_key  # imported where needed: `config` and `epochs` start fast

    files = sorted((src / split).glob("pt_*.npz"), key=lambda p: natural_key(p.stem))
    if not files:
        sys.exit(f"error: {src / split}: no pt_*.npz patients")
    return files[:most]


def chosen(val: list[Path], train: list[Path], budget: float) -> list[Path]:
    """The training patients, in order, whose npz files with the validation ones fit `budget`."""
    total, taken = sum(p.stat().st_size for p in val), []
    for p in train:
        total += p.stat().st_size
        if total > budget:
            break
        taken.append(p)
    return taken


def import_subset(val: list[Path], train: list[Path], out: Path, grid: int) -> None:
    """`nasdose data import` of a tree of links to the chosen patients."""
    from nas_dose.data import importer

    with tempfile.TemporaryDirectory() as tmp:
        for split, files in (("train", train), ("validation", val)):
            (Path(tmp) / split).mkdir()
            for f in files:
                (Path(tmp) / split / f.name).symlink_to(f.resolve())
        importer.run(importer.Config(grid=grid), importer.Inputs(Path(tmp)), out, force=True)


def cmd_data(a: argparse.Namespace) -> None:
    budget = LIMIT - MARGIN - travel_bytes(a.root) - folder_bytes(a.out.parent, a.out)
    val, train = patients(a.src, "validation", a.val), patients(a.src, "train", a.train)
    ratio = H5_PER_NPZ
    for _ in range(3):
        taken = chosen(val, train, budget / ratio)
        if not taken:
            sys.exit(f"error: {a.out}: {budget / MIB:.1f} MiB left under the device's {LIMIT // MIB} MiB: "
                     "not even one training patient fits beside the validation ones")
        import_subset(val, taken, a.out, a.grid)
        size = a.out.stat().st_size
        if size <= budget:
            break
        ratio = size / sum(p.stat().st_size for p in val + taken)
    else:
        sys.exit(f"error: {a.out}: {size / MIB:.1f} MiB, over the {budget / MIB:.1f} MiB left after 3 tries")
    info = {"train": len(taken), "validation": len(val), "grid": a.grid, "bytes": size,
            "source": str(a.src), "source_train": len(patients(a.src, "train", None)),
            "source_validation": len(patients(a.src, "validation", None))}
    save_json(a.out.with_suffix(".json"), info)
    travel = travel_bytes(a.root) + folder_bytes(a.out.parent, a.out) + size
    print(f"{a.out}: {len(taken)} of {info['source_train']} training and {len(val)} validation patients at "
          f"{a.grid}³, {size / MIB:.1f} MiB ({budget / MIB:.1f} MiB were left); what travels: {travel / MIB:.1f} "
          f"of {LIMIT // MIB} MiB")


def cmd_config(a: argparse.Namespace) -> None:
    """Write the recipe's training config and print its epochs (the most the check may train)."""
    recipe = load_yaml(a.recipe)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("train"), dict):
        sys.exit(f"error: {a.recipe}: no 'train' section (a pipeline recipe's training config)")
    if not isinstance(recipe["train"].get("epochs"), int):
        sys.exit(f"error: {a.recipe}: key 'train.epochs': an integer is needed (the most epochs the check trains)")
    save_yaml(a.out, recipe["train"])
    print(recipe["train"]["epochs"])


def cmd_pipeline(a: argparse.Namespace) -> None:
    """Write the pipeline smoke run's recipe: the GPU recipe with SMOKE (and DRY) laid over it."""
    save_yaml(a.out, apply_overrides(load_yaml(a.recipe), SMOKE + (DRY if a.dry else [])))


def pipeline_outcome(pipe: Path) -> dict[str, bool]:
    """Which of the smoke run's stages finished (wrote their final output)."""
    final = {"search": "search/pool.yaml", "ensemble": "ensemble/ensemble.yaml", "distill": "distill/comparison.md"}
    return {stage: (pipe / final[stage]).is_file() for stage in SMOKE_STAGES}


def history(run: Path) -> list[dict[str, Any]]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def epoch_ends(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries logged at an epoch's end (validated: the recipe validates every epoch)."""
    return [e for e in entries if e.get("val_dose_score") is not None]


def epochs_that_fit(entries: list[dict[str, Any]], wall: float, avail: float, most: int) -> int:
    """Epochs of a fresh run that fit `avail` seconds, from a 2-epoch probe run that took `wall`
    (its start and first epoch's warm-up included): the probe's wall time, then its second
    epoch's length for each epoch after two."""
    ends = epoch_ends(entries)
    if len(ends) < 2:
        sys.exit("error: the probe run logged fewer than 2 epoch ends")
    epoch = ends[1]["seconds"] - ends[0]["seconds"]
    return max(1, min(most, 2 + math.floor(SAFETY * (avail - wall) / epoch)))


def cmd_epochs(a: argparse.Namespace) -> None:
    print(epochs_that_fit(history(a.probe), a.wall, a.avail, a.most))


def step_rate(entries: list[dict[str, Any]]) -> float | None:
    """Median training steps/s between consecutive log entries neither of which ends an epoch
    (so no validation or checkpoint lies between them)."""
    rates = [(b["step"] - a["step"]) / (b["seconds"] - a["seconds"]) for a, b in zip(entries, entries[1:])
             if a.get("val_dose_score") is None and b.get("val_dose_score") is None and b["seconds"] > a["seconds"]]
    return statistics.median(rates) if rates else None


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def training_figures(run: Path, data: dict[str, Any]) -> dict[str, Any]:
    """What the run's log and metrics say: epochs, step rate, time per epoch, peak memory; and
    from them what an epoch of the whole training split would take (an estimate).

    `steps_per_s` counts steps between log entries inside an epoch: the GPU's pace while batches
    are ready, which a loader that cannot keep up only reaches in bursts. With the validation
    time logged at each epoch end, the rest of an epoch gives the pace the loader allowed, and
    the estimate uses that (with the logged wait for data, the share of an epoch spent waiting);
    without it, the estimate is a lower bound (GPU pace, `..._lower`)."""
    entries, metrics = history(run), load(run / "metrics.json")
    batch = load_yaml(run / "config.yaml")["data"]["batch_size"]
    ends, rate = epoch_ends(entries), step_rate(entries)
    steps_per_epoch = ends[0]["step"] if ends else None
    epochs = [b["seconds"] - a["seconds"] for a, b in zip(ends, ends[1:])]
    epoch_s = statistics.median(epochs) if epochs else None
    out: dict[str, Any] = {
        "finished": metrics is not None, "epochs_done": len(ends), "steps": entries[-1]["step"] if entries else 0,
        "seconds": entries[-1]["seconds"] if entries else None, "steps_per_epoch": steps_per_epoch,
        "steps_per_s": rate, "voxels_per_s": rate * batch * data["grid"] ** 3 if rate else None,
        "epoch_s_median_after_first": epoch_s,
        "best_val_dose_score_grid": min((e["val_dose_score"] for e in ends), default=None)}
    if metrics is not None:
        peak = metrics["peak_memory"]
        out.update(seconds_per_epoch=metrics["seconds_per_epoch"], peak_memory_gib=peak["bytes"] / 2 ** 30,
                   peak_memory_kind=peak["kind"], runtime=metrics["runtime"])
    if not (rate and epoch_s and steps_per_epoch):
        return out
    full_steps = math.ceil(data["source_train"] / batch)
    val_times = [e["val_seconds"] for e in ends[1:] if "val_seconds" in e]
    if val_times:
        val_s = statistics.median(val_times)
        paced = steps_per_epoch / (epoch_s - val_s)
        waits = [e["data_wait_s"] for e in ends[1:] if "data_wait_s" in e]
        out.update(val_s=val_s, epoch_steps_per_s=paced, loader_bound=paced < 0.8 * rate,
                   data_wait_share=statistics.median(waits) / epoch_s if waits else None,
                   full_split_steps=full_steps, full_split_epoch_s_estimate=full_steps / paced + val_s)
    else:  # validation and checkpoint time: what the epoch took beyond its steps at the GPU's pace
        rest = epoch_s - steps_per_epoch / rate
        out.update(epoch_rest_s=rest, full_split_steps=full_steps,
                   full_split_epoch_s_lower=full_steps / rate + rest)
    return out


def cmd_summary(a: argparse.Namespace) -> None:
    import torch

    from nas_dose.data.store import open_data

    cuda = torch.cuda.is_available()
    data = load(a.data.with_suffix(".json")) or {}
    with open_data(a.data) as d:
        data.update(train=len(d.ids("train")), validation=len(d.ids("validation")), grid=d.grid)
    data.setdefault("source_train", data["train"])
    suite = {}
    for f in sorted(a.out.glob("suite_*.json")):
        for name, outcome in json.loads(f.read_text())["benchmarks"].items():
            suite[name] = [{k: r.get(k) for k in ("quantity", "value", "status", "detail", "skipped")}
                           for r in outcome.get("result", {}).get("ratios", [])] or outcome.get("reason")
    scores = load(a.work / "eval" / "metrics.json")
    summary = {
        "machine": {"torch": torch.__version__, "cuda": torch.version.cuda,
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "cudnn": torch.backends.cudnn.version() if cuda else None},
        "wall_s": a.wall, "data": data, "suite": suite,
        "epochs_asked": a.epochs,
        "training": training_figures(a.work / "run", data) if (a.work / "run" / "config.yaml").is_file() else None,
        "validation_scores": None if scores is None else {k: scores.get(k) for k in ("dose_score", "dvh_score")},
        "pipeline": pipeline_outcome(a.work / "pipe") if (a.work / "pipe").is_dir() else None,
    }
    save_json(a.out / "summary.json", summary)
    print(report(summary))


def report(summary: dict[str, Any]) -> str:
    """summary.json as lines to read in the run's output."""
    lines = [f"{k}: {v}" for k, v in {**summary["machine"], "wall_s": round(summary["wall_s"]),
                                       "data": summary["data"], "epochs_asked": summary["epochs_asked"]}.items()]
    for name, rows in summary["suite"].items():
        lines += [f"{name}: {rows}"] if isinstance(rows, str) else [
            f"{name}: {r['quantity']} = {r['value'] if r['value'] is None else round(r['value'], 3)} "
            f"[{r['status']}] {r['skipped'] or r['detail']}" for r in rows]
    for key, value in (summary["training"] or {}).items():
        if key != "runtime":
            lines.append(f"training: {key} = {round(value, 4) if isinstance(value, float) else value}")
    lines.append(f"validation scores (OpenKBP, Gy): {summary['validation_scores']}")
    if summary.get("pipeline") is not None:
        lines.append(f"pipeline smoke run, stages finished: {summary['pipeline']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="the carried data set")
    d.add_argument("--src", type=Path, required=True, help="OpenKBP npz tree (train/, validation/)")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--root", type=Path, required=True, help="the repository whose working tree travels")
    d.add_argument("--grid", type=int, default=128)
    d.add_argument("--train", type=int, default=None, help="at most this many training patients")
    d.add_argument("--val", type=int, default=None, help="at most this many validation patients (default all)")
    c = sub.add_parser("config", help="a recipe's train section as a training config; prints its epochs")
    c.add_argument("recipe", type=Path)
    c.add_argument("out", type=Path)
    e = sub.add_parser("epochs", help="epochs that fit the seconds left")
    e.add_argument("probe", type=Path, help="the probe's run folder (2 epochs)")
    e.add_argument("--wall", type=float, required=True, help="the probe's wall time, s")
    e.add_argument("--avail", type=float, required=True, help="seconds the real run may take")
    e.add_argument("--most", type=int, required=True, help="the recipe's epochs")
    pl = sub.add_parser("pipeline", help="the pipeline smoke run's recipe")
    pl.add_argument("recipe", type=Path)
    pl.add_argument("out", type=Path)
    pl.add_argument("--dry", action="store_true", help="on the CPU at 16³ with tiny networks")
    s = sub.add_parser("summary", help="summary.json from the run's outputs")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--wall", type=float, required=True)
    s.add_argument("--epochs", type=int, default=None)
    a = p.parse_args(argv)
    {"data": cmd_data, "config": cmd_config, "epochs": cmd_epochs, "pipeline": cmd_pipeline,
     "summary": cmd_summary}[a.command](a)


if __name__ == "__main__":
    main()
