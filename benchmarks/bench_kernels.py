"""How close do the networks' 3×3×3 convolutions come to the machine's arithmetic peak?

Achieved GFLOP/s of one conv (c -> c channels at each resolution level of the LENAS network:
stem 16, widths 32…256, at the workload's grid and batch), forward alone (no autograd) and
forward + backward (input and weight gradients: 3× the forward FLOPs), against a large square
matrix multiply of the same dtype, the practical peak: fp32 everywhere, bf16 too on a GPU.
All kernels are timed interleaved. The ratios are information, not pass/fail: a low one says the
conv is bound by memory traffic or per-call overhead at that size rather than by arithmetic.

    python benchmarks/bench_kernels.py --quick
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from nas_dose.runtime import resolve_device
from nas_dose.search_spaces import count_flops, get_space

from common import Case, Row, Workload, main, result, si, speedup, time_cases, torch_state_restored, workload

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_case(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], Any], int]:
    """An n×n by n×n product and its FLOPs (2n³)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2 * n ** 3


def conv_cases(channels: int, size: int, batch: int, dtype: torch.dtype,
               device: torch.device) -> tuple[Callable[[], Any], Callable[[], Any], int]:
    """Forward and forward+backward calls of a c -> c 3×3×3 conv (no bias, as in the ops) on
    size³, and its forward FLOPs."""
    conv = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
    flops = count_flops(conv, (batch, channels, size, size, size))  # on the fp32 module: meta input is fp32
    conv = conv.to(device=device, dtype=dtype)
    x = torch.randn(batch, channels, size, size, size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.ones(batch, channels, size, size, size, device=device, dtype=dtype)

    def forward() -> None:
        with torch.no_grad():
            conv(x)

    def forward_backward() -> None:
        conv.weight.grad = x.grad = None
        conv(x).backward(grad)

    return forward, forward_backward, flops


def run(quick: bool, device: str = "auto", w: Workload | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    w = w or workload(quick, dev)
    macro = get_space("lenas").default_macro()
    levels = [(c, w.grid // 2 ** k) for k, c in enumerate([macro["stem"], *macro["widths"]])]
    n = 8192 if dev.type == "cuda" else 2048
    dtypes = ["fp32", "bf16"] if dev.type == "cuda" else ["fp32"]
    cases: dict[str, Case] = {}
    flops: dict[str, int] = {}
    with torch_state_restored():
        torch.backends.cudnn.benchmark = dev.type == "cuda"  # what a default Runtime sets
        for name in dtypes:
            dtype = _DTYPES[name]
            mm, flops[f"matmul_{name}"] = matmul_case(n, dtype, dev)
            cases[f"matmul_{name}"] = Case(mm)
            for c, size in levels:
                fwd, fwd_bwd, f = conv_cases(c, size, w.batch, dtype, dev)
                key = f"conv{c}@{size}_{name}"
                cases[f"{key}_fwd"], cases[f"{key}_fwdbwd"] = Case(fwd), Case(fwd_bwd)
                flops[f"{key}_fwd"], flops[f"{key}_fwdbwd"] = f, 3 * f
        timings, failed = time_cases(cases, dev, w.warmup, w.repeats)
    rows = []
    for name in dtypes:
        peak = timings.get(f"matmul_{name}")
        for c, size in levels:
            for mode, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
                key = f"conv{c}@{size}_{name}_{mode}"
                quantity = f"conv {c}→{c} @{size}³ {label} {name} GFLOP/s ÷ matmul"
                if key in failed or peak is None:
                    rows.append(Row(quantity, skipped=failed.get(key) or failed[f"matmul_{name}"]))
                    continue
                t = timings[key]
                # rate ratio = (flops_conv / t_conv) / (flops_mm / t_mm), per round
                ratio = speedup(t, peak) * flops[key] / flops[f"matmul_{name}"]
                rows.append(Row(quantity, ratio, detail=f"{si(t.rate(flops[key]), 'FLOP/s')} vs "
                                                        f"{si(peak.rate(flops[f'matmul_{name}']), 'FLOP/s')} "
                                                        f"({n}² matmul)"))
    notes = [f"batch {w.batch}; the conv sizes are the LENAS network's levels at {w.grid}³"]
    if dev.type == "cuda":
        notes.append(f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN conv "
                     f"{torch.backends.cudnn.allow_tf32} (PyTorch defaults): with TF32 convs and fp32 "
                     "matmuls an fp32 conv can exceed the fp32 matmul rate")
    else:
        notes.append("no GPU: bf16 kernels not measured")
    return result("kernels", dev, rows, w=w, measurements={k: {**t.to_dict(), "flops": flops[k]}
                                                            for k, t in timings.items()}, notes=notes)


if __name__ == "__main__":
    main("kernels", run, __doc__.split("\n\n")[0])
