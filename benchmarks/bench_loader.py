"""Can the data loader keep up with training? Samples/s that `DoseDataset` + `make_loader` deliver
on the device (augmentation on, as `nasdose train` loads; with 0, 1 and 2 worker processes; on a
GPU in pinned memory as `nasdose train` uses it, and once unpinned at 2 workers) ÷ samples/s
one training step consumes at the same grid and batch. A ratio ≥ 1 means the loader outpaces the
step; below 1 the GPU (or CPU) waits on data.

A synthetic data set is written to a temporary HDF5 file first. After the first pass the file
sits in the OS page cache, as a small data set does during training. On a CPU, loader workers and
the training step compete for the same cores, so a ratio measured apart is an upper bound.

    python benchmarks/bench_loader.py --quick
"""
from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from nas_dose.data.augment import AugmentConfig
from nas_dose.data.dataset import DoseDataset, make_loader
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

WORKERS = (0, 1, 2)
TARGET = 1.0


def epoch_reader(loader: Iterable[Any], runtime: Runtime) -> Callable[[], None]:
    """One pass over the loader, each batch copied to the device (as the training loop does)."""

    def read() -> None:
        for batch in loader:
            runtime.to_device(batch)

    return read


def run(quick: bool, device: str = "auto", w: Workload | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    w = w or workload(quick, dev)
    patients = 8 if quick else 12
    with tempfile.TemporaryDirectory() as tmp, torch_state_restored():
        path = Path(tmp) / "synth.h5"
        quiet = is_quiet()
        set_quiet(True)  # no progress bar in the middle of the suite's output
        try:
            write_dataset(path, synth_patients(patients, w.grid, seed=0), source="synth", grid=w.grid)
        finally:
            set_quiet(quiet)
        dataset = DoseDataset(path, "train", augment=AugmentConfig(), seed=0)
        runtime = default_runtime(dev)
        variants = [(n, dev.type == "cuda") for n in WORKERS]
        if dev.type == "cuda":  # what pinning buys, where it matters most
            variants.append((WORKERS[-1], False))
        loaders = {f"workers={n}" + (", pinned" if pin else ", not pinned" if dev.type == "cuda" else ""):
                   make_loader(dataset, w.batch, shuffle=True, num_workers=n, seed=0, pin_memory=pin)
                   for n, pin in variants}
        cases: dict[str, Any] = {name: epoch_reader(loader, runtime) for name, loader in loaders.items()}
        cases["train step"] = Stepper(genotype_network(w), runtime, random_batch(w)).train
        # One warm-up call (it starts the workers) is enough: a call reads a whole epoch.
        timings, failed = time_cases(cases, dev, 1, w.repeats)
        del loaders, cases  # stops the persistent workers before the file goes
        gc.collect()
    step = timings["train step"]
    step_rate = step.rate(w.batch)
    samples = len(dataset)
    rows = []
    for name in (n for n in timings if n != "train step"):
        t = timings[name]
        # rate ratio = (samples / t_epoch) / (batch / t_step), per round
        ratio = speedup(t, step) * samples / w.batch
        rows.append(Row(f"loader ({name}) samples/s ÷ training step", ratio, TARGET,
                        detail=f"{t.rate(samples):.3g} vs {step_rate:.3g} samples/s"))
    rows += [Row(f"loader ({name}) samples/s ÷ training step", skipped=why) for name, why in failed.items()]
    notes = [(f"{samples} training patients at {w.grid}³, batch {w.batch}; training step of the all-conv "
              f"LENAS network at {si(step.rate(w.voxels), 'vox/s')}"),
             "`nasdose train` defaults to data.num_workers=0: loading then runs between steps, not beside them"]
    return result("loader", dev, rows, w=w, runtime=runtime,
                  measurements={k: t.to_dict() for k, t in timings.items()}, notes=notes)


if __name__ == "__main__":
    main("loader", run, __doc__.split("\n\n")[0])
