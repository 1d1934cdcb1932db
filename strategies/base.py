"""What every search strategy shares: the scored candidate, the search context and the registry.

A strategy only decides which genotypes to try and how to score them; the context hands it the
data (disjoint weight and architecture patients), the device, the diversity references, a place
to checkpoint and a log, so strategies stay interchangeable under `nasdose search`.
"""
from __future__ import annotations

import importlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, Subset

from nas_dose import distributed
from nas_dose.config import from_dict
from nas_dose.data.dataset import DoseDataset
from nas_dose.errors import NasDoseError
from nas_dose.pool.candidate import Candidate
from nas_dose.pool.diversity import DiversityConfig
from nas_dose.runtime import Runtime
from nas_dose.search_spaces import SearchSpace
from nas_dose.training import dose_errors_gy


@dataclass
class SearchContext:
    """Everything a strategy may use; built by `nasdose search` (or by a test) for one search."""

    space: SearchSpace
    macro: dict[str, Any]
    data: Path
    runtime: Runtime
    seed: int
    weight_ids: list[str]
    arch_ids: list[str]
    diversity_ids: list[str]
    references: list[dict[str, np.ndarray]] = field(default_factory=list)
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
    state_dir: Path | None = None  # strategies checkpoint here; None: nothing is persisted
    log_path: Path | None = None  # JSON lines; None: records are dropped
    log_fields: dict[str, Any] = field(default_factory=dict)  # added to every record (e.g. search index)
    deadline: float | None = None  # time.monotonic() after which should_stop() is true
    _all: DoseDataset | None = field(default=None, init=False, repr=False)
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        if set(self.weight_ids) & set(self.arch_ids):
            shared = sorted(set(self.weight_ids) & set(self.arch_ids))
            raise NasDoseError(f"{self.data}: weight and architecture patients overlap ({', '.join(shared[:5])})")
        if not self.weight_ids or not self.arch_ids:
            raise NasDoseError(f"{self.data}: a search needs weight and architecture patients")

    def dataset(self, ids: Iterable[str]) -> Subset:
        """The patients `ids` (of any split), in that order, without augmentation."""
        if self._all is None:
            self._all = DoseDataset(self.data, None)
            self._index = {pid: i for i, pid in enumerate(self._all.ids)}
        ids = list(ids)
        missing = [pid for pid in ids if pid not in self._index]
        if missing:
            raise NasDoseError(f"{self.data}: no patient(s) {', '.join(missing[:5])}")
        return Subset(self._all, [self._index[pid] for pid in ids])

    def loader(self, ids: Iterable[str], *, train: bool, batch_size: int, seed: int | None = None,
               shard: bool = False) -> DataLoader:
        """Batches of `ids`; `train` shuffles with a generator seeded by `seed` (default ctx.seed).

        `shard`: in a distributed run, this rank's equal share of each batch of `batch_size` (the
        global batch), drawn in the same order as one process draws it, for data-parallel steps.
        """
        generator = None
        if train:
            generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        dataset = self.dataset(ids)
        if shard:
            order = RandomSampler(dataset, generator=generator) if train else SequentialSampler(dataset)
            return DataLoader(dataset, batch_sampler=distributed.ShardedBatches(order, batch_size, even=True),
                              generator=generator, num_workers=0, pin_memory=self.runtime.pin_memory)
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, generator=generator,
                          drop_last=False, num_workers=0, pin_memory=self.runtime.pin_memory)

    def state_path(self, name: str) -> Path | None:
        """Where a strategy keeps its state `name`; None when this search is not persisted."""
        if self.state_dir is None:
            return None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return self.state_dir / name

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (with a wall-clock time and the context's log fields)."""
        if self.log_path is None or not distributed.writes_here():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": round(time.time(), 3), **self.log_fields, **record}, default=_plain)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def should_stop(self) -> bool:
        """True once the search's time budget is spent (by the main rank's clock: every rank of
        a distributed search must take the same branch, so this is collective)."""
        return self.deadline is not None and distributed.broadcast_object(time.monotonic() >= self.deadline)

    def input_shape(self) -> tuple[int, ...]:
        """(1, C, D, H, W) of one model input, e.g. for counting FLOPs."""
        return (1, *self.dataset(self.weight_ids[:1])[0]["input"].shape)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ids: Iterable[str]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Per-patient validation dose scores (Gy, as nas_dose.train scores) of `model` on `ids`,
        and its predictions there as `nasdose predict` makes them: dose / 70, float32,
        non-negative and zero outside the possible-dose mask."""
        was_training = model.training
        model.eval()
        errors: dict[str, float] = {}
        out: dict[str, np.ndarray] = {}
        for batch in self.loader(ids, train=False, batch_size=1):
            batch = self.runtime.to_device(batch)
            with self.runtime.autocast():
                pred = model(batch["input"])
            errors.update(zip(batch["id"], dose_errors_gy(pred, batch["target"], batch["mask"]).tolist()))
            pred = pred.float().clamp_min(0) * batch["mask"]
            for pid, p in zip(batch["id"], pred):
                out[pid] = p[0].cpu().numpy()
        model.train(was_training)
        return errors, out


class Strategy(ABC):
    """A search strategy: `run` returns every distinct candidate it scored, best first (a
    strategy may put its own answer first, as differentiable does with its strongest ops)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    uses_references: ClassVar[bool] = False  # whether run() honours ctx.references (sequential diversity)
    # how Candidate.predictions were made, recorded in pool.yaml beside the diversity matrices
    predictions_from: ClassVar[str] = "the networks the strategy scored each candidate with"

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> Strategy:
        """The strategy with its options validated against its Config dataclass."""
        return cls(from_dict(cls.Config, options))

    @abstractmethod
    def run(self, ctx: SearchContext) -> list[Candidate]:
        """Search; resumable through ctx.state_path."""


S = TypeVar("S", bound=type[Strategy])
_REGISTRY: dict[str, type[Strategy]] = {}
# Built-in strategies are imported on first use, so that e.g. NNI is only loaded when asked for.
_BUILTIN: dict[str, str] = {
    "differentiable": "differentiable",
    "evolution": "evolution",
    "random": "random_search",
    "nni": "nni_backend",
}


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: make a Strategy available to `nasdose search` as `strategy: name`."""

    def add(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def get_strategy(name: str) -> type[Strategy]:
    """The Strategy class registered as `name` (an unknown name is a user error)."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(f"{__package__}.{_BUILTIN[name]}")
    if name not in _REGISTRY:
        raise NasDoseError(f"strategy: unknown strategy {name!r} (known: {', '.join(list_strategies())})")
    return _REGISTRY[name]


def list_strategies() -> list[str]:
    """Names of the built-in and registered strategies, sorted."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays and paths in log records."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    return str(value)
