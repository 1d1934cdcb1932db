"""Can the data loader keep up with training? Samples/s that `DoseDataset` + `make_loader` deliver
on the device (augmentation on, as `nasdose train` loads; with 0, 1 and 2 worker processes on a
CPU, up to 12 on a GPU machine, there in pinned memory as `nasdose train` uses it and once
unpinned; and at the most workers once without augmentation, which says whether augmenting or
reading limits) ÷ samples/s one training step consumes at the same grid and batch. A ratio ≥ 1
means the loader outpaces the step; below 1 the GPU (or CPU) waits on data. And the augmentation's
rotation, which dominates a patient's load: patients read per second with every one rotated,
`augment`'s gathered rows ÷ 3D spline resampling of the same rotation by scipy.ndimage.

A synthetic data set is written to a temporary HDF5 file first. After the first pass the file
sits in the OS page cache, as a small data set does during training. On a CPU, loader workers and
the training step compete for the same cores, so a ratio measured apart is an upper bound.

    python benchmarks/bench_loader.py --quick
"""
from __future__ import annotations

import gc
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from scipy import ndimage

import nas_dose.data.augment as augment_module
from nas_dose.data.augment import AugmentConfig
from nas_dose.data.dataset import DoseDataset, make_loader
from nas_dose.data.patient import Patient
from nas_dose.data.store import write_dataset
from nas_dose.data.synth import synth_patients
from nas_dose.progress import is_quiet, set_quiet
from nas_dose.runtime import Runtime, resolve_device

from common import (
    Row,
    Stepper,
    Workload,
    default_runtime,
    genotype_network,
    main,
    random_batch,
    result,
    si,
    speedup,
    time_cases,
    torch_state_restored,
    workload,
)

TARGET = 1.0


def worker_counts(device: torch.device) -> tuple[int, ...]:
    """On a CPU the step needs the cores itself, so few workers; a GPU machine's cores are all
    free for loading, and how many it takes to feed the GPU is the question."""
    if device.type != "cuda":
        return (0, 1, 2)
    cpus = os.cpu_count() or 1
    return tuple(sorted({0, *(n for n in (4, 8, 12) if n < cpus)}))


def epoch_reader(loader: Iterable[Any], runtime: Runtime) -> Callable[[], None]:
    """One pass over the loader, each batch copied to the device (as the training loop does)."""

    def read() -> None:
        for batch in loader:
            runtime.to_device(batch)

    return read


def ndimage_rotate(volume: np.ndarray, angle_deg: float, order: int, background: float) -> np.ndarray:
    """The baseline of the rotation row: the same rotation by 3D spline resampling of each voxel
    (`augment._rotate` matches it to float rounding, by gathering rows instead)."""
    theta = math.radians(angle_deg)
    cos, sin = round(math.cos(theta), 12), round(math.sin(theta), 12)
    matrix = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
    centre = (np.array(volume.shape, dtype=float) - 1) / 2
    return ndimage.affine_transform(np.ascontiguousarray(volume), matrix, offset=centre - matrix @ centre,
                                    order=order, mode="constant", cval=float(background))


def rotated_reads(path: Path, count: int, rotate: Callable[..., np.ndarray]) -> Callable[[], None]:
    """Read `count` patients in this process, each rotated (and flipped and shifted) by `rotate`."""
    dataset = DoseDataset(path, "train", augment=AugmentConfig(probability=1.0), seed=0)

    def read() -> None:
        kept = augment_module._rotate
        augment_module._rotate = rotate
        try:
            for i in range(count):
                dataset[i]
        finally:
            augment_module._rotate = kept

    return read


def phantoms(n: int, grid: int, distinct: int = 4) -> list[Patient]:
    """`n` training patients: copies of a few phantoms under their own ids (making a 128³ phantom
    takes longer than reading one, and the loader's cost does not depend on which it reads)."""
    made = list(synth_patients(distinct, grid, seed=0))
    return [replace(made[i % distinct], id=f"pt_{i + 1}", attrs={**made[i % distinct].attrs, "split": "train"})
            for i in range(n)]


def run(quick: bool, device: str = "auto", w: Workload | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    w = w or workload(quick, dev)
    counts = worker_counts(dev)
    # Each worker needs a few batches an epoch, or an epoch times one sample's latency, not the rate.
    patients = max(8 if quick else 12, 2 * w.batch * counts[-1])
    with tempfile.TemporaryDirectory() as tmp, torch_state_restored():
        path = Path(tmp) / "synth.h5"
        quiet = is_quiet()
        set_quiet(True)  # no progress bar in the middle of the suite's output
        try:
            write_dataset(path, phantoms(patients, w.grid), source="synth", grid=w.grid)
        finally:
            set_quiet(quiet)
        dataset = DoseDataset(path, "train", augment=AugmentConfig(), seed=0)
        runtime = default_runtime(dev)
        variants = [(n, dev.type == "cuda") for n in counts]
        if dev.type == "cuda":  # what pinning buys, where it matters most
            variants.append((counts[-1], False))
        loaders = {f"workers={n}" + (", pinned" if pin else ", not pinned" if dev.type == "cuda" else ""):
                   make_loader(dataset, w.batch, shuffle=True, num_workers=n, seed=0, pin_memory=pin)
                   for n, pin in variants}
        # The most workers without augmentation: near the rows above, reading and moving the
        # arrays limits the loader; far faster, augmenting them does (and belongs on the GPU).
        plain = DoseDataset(path, "train", augment=AugmentConfig(enabled=False), seed=0)
        loaders[f"workers={counts[-1]}, no augmentation"] = make_loader(
            plain, w.batch, shuffle=True, num_workers=counts[-1], seed=0, pin_memory=dev.type == "cuda")
        cases: dict[str, Any] = {name: epoch_reader(loader, runtime) for name, loader in loaders.items()}
        cases["train step"] = Stepper(genotype_network(w), runtime, random_batch(w)).train
        rotation = {"rows": augment_module._rotate, "ndimage": ndimage_rotate}
        cases.update({f"rotation by {name}": rotated_reads(path, 4, fn) for name, fn in rotation.items()})
        # One warm-up call (it starts the workers) is enough: a call reads a whole epoch.
        timings, failed = time_cases(cases, dev, 1, w.repeats)
        del loaders, cases  # stops the persistent workers before the file goes
        gc.collect()
    step = timings["train step"]
    step_rate = step.rate(w.batch)
    samples = len(dataset)
    rows = []
    for name in (n for n in timings if n.startswith("workers=")):
        t = timings[name]
        # rate ratio = (samples / t_epoch) / (batch / t_step), per round
        ratio = speedup(t, step) * samples / w.batch
        rows.append(Row(f"loader ({name}) samples/s ÷ training step", ratio, TARGET,
                        detail=f"{t.rate(samples):.3g} vs {step_rate:.3g} samples/s"))
    rows += [Row(f"loader ({name}) samples/s ÷ training step", skipped=why)
             for name, why in failed.items() if name.startswith("workers=")]
    quantity = "rotated patient reads/s, rotation by gathered rows ÷ by 3D resampling (ndimage)"
    if {"rotation by rows", "rotation by ndimage"} <= set(timings):
        rows.append(Row(quantity, speedup(timings["rotation by rows"], timings["rotation by ndimage"]), TARGET,
                        detail=f"{timings['rotation by rows'].rate(4):.3g} vs "
                               f"{timings['rotation by ndimage'].rate(4):.3g} patients/s, one process"))
    else:
        rows.append(Row(quantity, skipped="; ".join(failed.get(f"rotation by {n}", "") for n in ("rows", "ndimage"))))
    notes = [(f"{samples} training patients at {w.grid}³, batch {w.batch}; training step of the all-conv "
              f"LENAS network at {si(step.rate(w.voxels), 'vox/s')}"),
             "`nasdose train` defaults to data.num_workers=0 on a CPU (loading between steps) and to all "
             "but two cores, at most 12, with CUDA"]
    return result("loader", dev, rows, w=w, runtime=runtime,
                  measurements={k: t.to_dict() for k, t in timings.items()}, notes=notes)


if __name__ == "__main__":
    main("loader", run, __doc__.split("\n\n")[0])
