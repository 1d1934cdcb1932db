"""How a model runs: device, cuDNN autotuning, mixed precision, memory layout, threads, seeds.

Every command that runs a network goes through `Runtime`, so the speed settings are decided in
one place and `describe()` can record, in each run's outputs, the settings that were actually in
force (what was asked can differ: no AMP on a CPU, no cuDNN without CUDA).
"""
from __future__ import annotations

import contextlib
import os
import platform
import random
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import distributed
from .config import ConfigError
from .errors import NasDoseError

AmpMode = Literal["auto", "bf16", "fp16", "off"]
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RuntimeConfig:
    """Execution settings; none of them changes what is computed, only how (and how fast)."""

    device: str = "auto"
    cudnn_benchmark: bool = True
    amp: AmpMode = "auto"
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None
    deterministic: bool = False

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"config key 'runtime.threads': must be at least 1, got {self.threads}")


def default_loader_workers(device_type: str, cpus: int) -> int:
    """0 on a CPU: loading is far cheaper than a CPU step, and workers would take the cores the
    step needs. With CUDA all but two cores (at most 12): reading and augmenting a 128³ patient
    costs a core about as long as a dozen GPU steps, so few workers leave the GPU waiting."""
    return max(1, min(12, cpus - 2)) if device_type == "cuda" else 0


def resolve_device(name: str) -> torch.device:
    """`auto` is a CUDA device when there is one, else the CPU; an unusable name is an error.

    `auto` and `cuda` mean the first GPU, or under torchrun the GPU of this process (LOCAL_RANK).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise NasDoseError(f"runtime.device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NasDoseError(f"runtime.device: {name!r} was asked for but CUDA is not available "
                               "(use device=cpu or auto)")
        index = distributed.cuda_index() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise NasDoseError(f"runtime.device: {name!r} does not exist "
                               f"({torch.cuda.device_count()} CUDA device(s))")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise NasDoseError(f"runtime.device: device type {device.type!r} is not supported (use cpu or cuda)")
    return device


def _amp_dtype(mode: AmpMode, device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force: none on a CPU (slow there, and no cuDNN); bf16 where supported."""
    if device.type != "cuda" or mode == "off":
        return None
    bf16_ok = torch.cuda.is_bf16_supported()
    if mode == "auto":
        return torch.bfloat16 if bf16_ok else torch.float16
    if mode == "bf16" and not bf16_ok:
        raise NasDoseError(f"runtime.amp: bf16 is not supported on {torch.cuda.get_device_name(device)} "
                           "(use fp16 or off)")
    return _AMP_DTYPES[mode]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices), so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain values (a checkpoint loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "cached_gaussian": float(numpy_state["gauss"])},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only where the devices are there)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


class Runtime:
    """Applies a RuntimeConfig to the process (threads, cuDNN, determinism) and runs models by it."""

    def __init__(self, cfg: RuntimeConfig | None = None) -> None:
        self.cfg = cfg = cfg or RuntimeConfig()
        cfg.validate()
        self.device = resolve_device(cfg.device)
        self.amp_dtype = _amp_dtype(cfg.amp, self.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic and self.device.type == "cuda":
            # cuBLAS needs this before its first use to pick deterministic workspaces.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(cfg.deterministic)
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.backends.cudnn.benchmark = (cfg.cudnn_benchmark and not cfg.deterministic
                                          and self.device.type == "cuda")

    @property
    def amp(self) -> str:
        """The mixed precision in force: 'bf16', 'fp16' or 'off'."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.amp_dtype]

    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed-precision context for forward passes (a no-op when AMP is off)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, active only for fp16 (bf16 has float32's range and needs none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model on the device, in the chosen memory layout, compiled if asked.

        Returns the module to call; with compile it wraps `model`, whose parameters it shares,
        so state dicts are still taken from `model`.
        """
        model = model.to(self.device)
        if self.cfg.channels_last:
            # Module.to takes memory_format, which torch's type hints leave out.
            model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        if self.cfg.compile:
            return torch.compile(model)  # type: ignore[return-value]
        return model

    def to_device(self, batch: Any) -> Any:
        """Tensors (also inside dicts, lists, tuples) on the device; 5-D float ones channels-last if set."""
        if isinstance(batch, torch.Tensor):
            out = batch.to(self.device, non_blocking=True)
            if self.cfg.channels_last and out.dim() == 5 and out.is_floating_point():
                out = out.contiguous(memory_format=torch.channels_last_3d)
            return out
        if isinstance(batch, dict):
            return {k: self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.to_device(v) for v in batch)
        return batch

    def loader_workers(self, requested: int | None) -> int:
        """Loader worker processes: `requested`, or with None `default_loader_workers` of this
        process's share of the node's cores (torchrun starts one process per GPU)."""
        if requested is not None:
            return requested
        return default_loader_workers(self.device.type, (os.cpu_count() or 1) // distributed.local_world_size())

    def reset_peak_memory(self) -> None:
        """Start a new `peak_memory` window (on a CPU the process's peak cannot be reset)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> dict[str, Any]:
        """{kind, bytes}: with CUDA the most tensor memory allocated on the device since
        `reset_peak_memory` ("cuda_max_allocated"); on a CPU the process's peak resident set
        size since it started ("process_max_rss"), the nearest measure there is."""
        if self.device.type == "cuda":
            return {"kind": "cuda_max_allocated", "bytes": torch.cuda.max_memory_allocated(self.device)}
        import resource  # Unix only; imported here so the rest of the module works elsewhere

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"kind": "process_max_rss", "bytes": rss if sys.platform == "darwin" else rss * 1024}

    def free_memory(self) -> int | None:
        """Bytes a new allocation can still get: the device's free memory plus what the caching
        allocator holds unused; on a CPU the available physical memory (None where unknown)."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None

    @property
    def pin_memory(self) -> bool:
        """Pinned host memory makes `non_blocking` copies asynchronous; only useful with CUDA."""
        return self.device.type == "cuda"

    def describe(self) -> dict[str, Any]:
        """The settings in force, with versions and the device's name, for a run's records."""
        cuda = self.device.type == "cuda"
        return {
            "torch": str(torch.__version__),
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if cuda
            else (platform.processor() or platform.machine()),
            "amp": self.amp,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "channels_last": self.cfg.channels_last,
            "compile": self.cfg.compile,
            "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
        }
