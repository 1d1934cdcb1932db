"""Does the genotype machinery cost anything? Training-step and inference throughput (voxels/s) of
a network built from a genotype (`nas_dose.search_spaces.build_model`) against the same network
written out by hand in plain PyTorch.

The genotype is LENAS with a plain 3×3×3 conv in every slot; `PlainUNet` below is that network's
computation as straightforward conv / norm / ReLU code. Before timing, the two are checked to be
the same computation: equal parameter shapes, equal FLOPs (`count_flops`), and equal outputs
once the genotype network's weights are copied into the plain one. Target: ratio ≥ 0.95.

    python benchmarks/bench_throughput.py --quick
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from nas_dose.runtime import resolve_device
from nas_dose.search_spaces import count_flops, count_params

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

TARGET = 0.95
FLOP_TOLERANCE = 0.03


def conv_norm_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.InstanceNorm3d(c_out, affine=True), nn.ReLU())


class PlainUNet(nn.Module):
    """The all-conv LENAS network by hand: per level `pre` conv, two convs, a residual add of the
    `pre` output, then a stride-2 conv down or a stride-2 transposed conv up; skip concatenation;
    1×1×1 head. Modules are created in the genotype network's order so weights copy across."""

    def __init__(self, in_channels: int, out_channels: int, stem: int, widths: Sequence[int]) -> None:
        super().__init__()
        c = [stem, *widths]
        self.depth = depth = len(widths)
        self.stem = conv_norm_relu(in_channels, c[0])
        self.encoder = nn.ModuleList(
            nn.ModuleList([conv_norm_relu(c[i], c[i]), conv_norm_relu(c[i], c[i]), conv_norm_relu(c[i], c[i]),
                           conv_norm_relu(c[i], c[i + 1], stride=2)])
            for i in range(depth))
        self.decoder = nn.ModuleList(
            nn.ModuleList([conv_norm_relu(c[j + 1] * (1 if j == depth - 1 else 2), c[j + 1]),
                           conv_norm_relu(c[j + 1], c[j + 1]), conv_norm_relu(c[j + 1], c[j + 1]),
                           nn.ConvTranspose3d(c[j + 1], c[j], 3, stride=2, padding=1, bias=False),
                           nn.Sequential(nn.InstanceNorm3d(c[j], affine=True), nn.ReLU())])
            for j in range(depth))
        self.head = nn.Conv3d(2 * c[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for pre, op1, op2, down in self.encoder:  # type: ignore[misc]
            p = pre(x)
            h = op2(op1(p)) + p
            skips.append(h)
            x = down(h)
        for j in reversed(range(self.depth)):
            pre, op1, op2, up, norm_relu = self.decoder[j]  # type: ignore[misc]
            p = pre(x)
            h = op2(op1(p)) + p
            x = torch.cat([norm_relu(up(h, output_size=list(skips[j].shape[2:]))), skips[j]], dim=1)
        return self.head(x)


def plain_network(w: Workload) -> PlainUNet:
    m = w.macro()
    return PlainUNet(m["in_channels"], m["out_channels"], m["stem"], m["widths"])


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy parameters in creation order; any shape mismatch means the networks differ."""
    src, dst = list(source.parameters()), list(target.parameters())
    shapes = ([tuple(p.shape) for p in src], [tuple(p.shape) for p in dst])
    if shapes[0] != shapes[1]:
        raise AssertionError(f"the plain U-Net does not mirror the genotype network: parameter shapes "
                             f"{shapes[1]} != {shapes[0]}")
    with torch.no_grad():
        for s, d in zip(src, dst, strict=True):
            d.copy_(s)


def check_same_computation(genotype: nn.Module, plain: nn.Module, w: Workload,
                           device: torch.device) -> dict[str, Any]:
    """FLOPs, parameters and outputs (fp32, batch 1, on `device`) of the two networks."""
    flops = count_flops(genotype, w.input_shape), count_flops(plain, w.input_shape)
    copy_weights(genotype, plain)
    genotype.to(device), plain.to(device)
    x = torch.randn(1, *w.input_shape[1:], generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        diff = (genotype(x) - plain(x)).abs().max().item()
    return {"flops_genotype": flops[0], "flops_plain": flops[1], "params_genotype": count_params(genotype),
            "params_plain": count_params(plain), "max_abs_output_difference": diff}


def run(quick: bool, device: str = "auto", w: Workload | None = None) -> dict[str, Any]:
    """Time training steps and forward passes of both networks, interleaved."""
    dev = resolve_device(device)
    w = w or workload(quick, dev)
    with torch_state_restored():
        genotype, plain = genotype_network(w), plain_network(w)
        check = check_same_computation(genotype, plain, w, dev)
        runtime = default_runtime(dev)
        batch = random_batch(w)
        steppers = {"genotype": Stepper(genotype, runtime, batch), "plain": Stepper(plain, runtime, batch)}
        cases = {f"{name}_{mode}": getattr(s, mode) for mode in ("train", "infer") for name, s in steppers.items()}
        # A second copy of the genotype network: their ratio shows the noise floor of this machine.
        cases["genotype_copy_train"] = Stepper(genotype, runtime, batch).train
        timings, failed = time_cases(cases, dev, w.warmup, w.repeats)
    if failed:
        raise RuntimeError(f"throughput: {failed}")
    flops = check["flops_genotype"]
    rows = [Row("FLOPs genotype ÷ plain U-Net", flops / check["flops_plain"], 1 - FLOP_TOLERANCE,
                1 + FLOP_TOLERANCE, f"{si(flops, 'FLOP')} per forward; outputs differ by "
                f"{check['max_abs_output_difference']:.1e} with equal weights")]
    for mode, label, work in (("train", "training step", 3 * flops), ("infer", "inference", flops)):
        g, p = timings[f"genotype_{mode}"], timings[f"plain_{mode}"]
        rows.append(Row(f"{label} voxels/s genotype ÷ plain U-Net", speedup(g, p), TARGET,
                        detail=f"{si(g.rate(w.voxels), 'vox/s')} vs {si(p.rate(w.voxels), 'vox/s')}; "
                               f"≈{si(g.rate(work), 'FLOP/s')}"))
    copy = timings["genotype_copy_train"]
    rows.append(Row("training step genotype ÷ its copy (noise floor)", speedup(timings["genotype_train"], copy),
                    detail="identical networks: the spread of this ratio around 1 is measurement noise"))
    return result("throughput", dev, rows, w=w, runtime=runtime,
                  measurements={"check": check, **{k: t.to_dict() for k, t in timings.items()}},
                  notes=["training FLOP/s counts a backward pass as twice the forward FLOPs"])


if __name__ == "__main__":
    main("throughput", run, __doc__.split("\n\n")[0])
