"""Cost of one search step relative to one training step of the final network, side by side.

    python benchmarks/bench_search.py [--quick] [--device cpu|cuda] [--threads N] [--out FILE.json]

Timed interleaved in one process (`common.time_cases`), on the same random batch, same macro,
batch and input size (`common.workload`):

- final: one training step of the network built from the derived genotype (the strongest op
  per slot of the supernet, its α drawn at random, seeded), run as `train_model` runs it;
- softmax: one DARTS search step = a weight step (all candidates mixed, α frozen) plus an
  architecture step (α only, weights frozen), as `strategies.differentiable` alternates them;
- gumbel: the same two steps with one Gumbel-sampled path per slot per forward;
- spos: one single-path step on a uniformly drawn path (the "inherit" evaluator's supernet).

Ratios are medians of per-round ratios (`common.speedup`). Targets from the issue: a gumbel
step ≤ 2× and a softmax step ≤ 6× the final network's training step.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from nas_dose.runtime import Runtime, resolve_device, seed_everything
from nas_dose.search_spaces import Supernet, get_space
from nas_dose.strategies.evaluator import random_path
from nas_dose.training import OptimConfig, masked_loss
from nas_dose.training.optimization import make_optimizer

from common import Row, Stepper, Workload, default_runtime, random_batch, result, speedup, time_cases, workload
from common import main as bench_main

# search step -> (what it is, highest allowed ratio to the final network's step or None)
STEPS: dict[str, tuple[str, float | None]] = {
    "softmax": ("softmax search step (weight + α) ÷ final-network training step", 6.0),
    "gumbel": ("gumbel search step (weight + α) ÷ final-network training step", 2.0),
    "spos": ("SPOS single-path step ÷ final-network training step", None),
}


class SearchStepper:
    """The supernet's steps as the strategies take them (Adam, masked L1, the runtime's autocast
    and loss scaler); the parameters not being updated are frozen, so they get no gradient."""

    def __init__(self, supernet: Supernet, runtime: Runtime, batch: dict[str, torch.Tensor], seed: int) -> None:
        self.supernet = supernet
        self.runtime = runtime
        self.net = runtime.prepare(supernet)
        self.batch = runtime.to_device(dict(batch))
        self.weights, self.alphas = supernet.weight_parameters(), supernet.arch_parameters()
        self.w_opt = make_optimizer(self.weights, OptimConfig(lr=1e-3))
        self.a_opt = make_optimizer(self.alphas, OptimConfig(lr=3e-4))
        self.scaler = runtime.grad_scaler()
        self.rng = np.random.RandomState(seed)

    def _update(self, opt: torch.optim.Optimizer, frozen: list[torch.nn.Parameter]) -> None:
        for p in frozen:
            p.requires_grad_(False)
        try:
            opt.zero_grad(set_to_none=True)
            with self.runtime.autocast():
                pred = self.net(self.batch["input"])
            self.scaler.scale(masked_loss(pred, self.batch["target"], self.batch["mask"])).backward()
            self.scaler.step(opt)
            self.scaler.update()
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def search(self, mode: str) -> Callable[[], None]:
        """A weight step then an architecture step, mixing the ops in `mode`."""
        def step() -> None:
            self.supernet.fix(None)
            self.supernet.mode = mode
            self._update(self.w_opt, self.alphas)
            self._update(self.a_opt, self.weights)
        return step

    def spos(self) -> None:
        self.supernet.fix(random_path(self.supernet, self.rng))
        self._update(self.w_opt, self.alphas)


def run(quick: bool, device: str = "auto", w: Workload | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    w = w or workload(quick, dev)
    runtime = default_runtime(dev)
    space = get_space("lenas")
    batch = random_batch(w)
    seed_everything(0)
    supernet = Supernet(space, w.macro())
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for a in supernet.arch_parameters():
            a.copy_(torch.randn(a.shape, generator=gen))
    genotype = supernet.genotype()
    final = Stepper(space.build(genotype), runtime, batch)
    search = SearchStepper(supernet, runtime, batch, seed=0)
    cases = {"final": final.train, "softmax": search.search("softmax"), "gumbel": search.search("gumbel"),
             "spos": search.spos}
    timings, failed = time_cases(cases, dev, w.warmup, w.repeats)
    rows = []
    for name, (quantity, high) in STEPS.items():
        if name in failed or "final" in failed:
            rows.append(Row(quantity, skipped=failed.get(name) or failed["final"]))
            continue
        ms = {k: timings[k].median_s * 1000 for k in (name, "final")}
        rows.append(Row(quantity, speedup(timings["final"], timings[name]), high=high,
                        detail=f"{ms[name]:.1f} ms vs {ms['final']:.1f} ms (medians)"))
    return result("search", dev, rows, w=w, runtime=runtime,
                  measurements={"genotype": genotype.to_dict(),
                                "timings": {k: t.to_dict() for k, t in timings.items()}, "failed": failed})


if __name__ == "__main__":
    bench_main("search", run, __doc__.splitlines()[0])
