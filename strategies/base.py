"""What every search strategy shares: the scored candidate, the search context and the registry.

A strategy only decides which genotypes to try and how to score them; the context hands it the
data (disjoint weight and architecture patients), the device, the diversity references, a place
to checkpoint and a log, so strategies stay interchangeable under `nasdose search`.
"""
from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from nas_dose import distributed
from nas_dose.config import from_dict
from nas_dose.errors import NasDoseError
from nas_dose.models.conditioning import any_setting
from nas_dose.pool.candidate import Candidate
from nas_dose.pool.diversity import DiversityConfig
from nas_dose.registry import Registry
from nas_dose.runtime import Runtime
from nas_dose.search_spaces import SearchSpace, count_flops, count_params, forward_latency
from nas_dose.training import dose_errors_gy
from nas_dose.training.engine import forward
from nas_dose.training.events import EventLog

from .task import Items, SearchTask, per_patient

# Fields of a log record that a re-run derives differently: when it was logged, how long scoring
# took, a measured latency.
WALL_CLOCK = ("time", "seconds", "latency_ms")
LATENCY_RUNS = 5  # timed forward passes of a candidate's latency (their median)


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
    events: EventLog = field(default_factory=EventLog)  # TensorBoard curves (logging.tensorboard); off: nothing
    task: SearchTask | None = None  # what it learns and scores on; None: whole volumes of `data`
    # What the searches of one run share (a sequential run's K searches, each with its own
    # `seed`): a folder for the evaluator's cached scores, the file of its trained supernets, and
    # the seed they are made with. None: this search's state_dir, no file of its own, and `seed`.
    shared_dir: Path | None = None
    supernet_file: Path | None = None
    run_seed: int | None = None
    measure_latency: bool = False  # whether `cost` measures latency (`cost: latency` asks for it)
    _task: SearchTask = field(init=False, repr=False)
    _logged: set[str] = field(default_factory=set, init=False, repr=False)  # see _logged_records
    _log_size: int = field(default=-1, init=False, repr=False)  # the log's size when _logged was read

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self._task = self.task or SearchTask(self.data)
        if set(self.weight_ids) & set(self.arch_ids):
            shared = sorted(set(self.weight_ids) & set(self.arch_ids))
            raise NasDoseError(f"{self.data}: weight and architecture patients overlap ({', '.join(shared[:5])})")
        if not self.weight_ids or not self.arch_ids:
            raise NasDoseError(f"{self.data}: a search needs weight and architecture patients")

    def dataset(self, ids: Iterable[str], train: bool = False, seed: int | None = None) -> Items:
        """The items of patients `ids` (of any split), in that order, without augmentation: the
        task's scoring items, or (`train`) its training items drawn from `seed` (default ctx.seed)."""
        return self._task.items(list(ids), train, self.seed if seed is None else seed)

    def loader(self, ids: Iterable[str], *, train: bool, batch_size: int, seed: int | None = None,
               shard: bool = False) -> DataLoader:
        """Batches of `ids`; `train` shuffles with a generator seeded by `seed` (default ctx.seed),
        over training items drawn from the same seed.

        `shard`: in a distributed run, this rank's equal share of each batch of `batch_size` (the
        global batch), drawn in the same order as one process draws it, for data-parallel steps.
        """
        generator = None
        seed = self.seed if seed is None else seed
        if train:
            generator = torch.Generator().manual_seed(seed)
        dataset = self.dataset(ids, train, seed)
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

    def shared_path(self, name: str) -> Path | None:
        """Where state `name` that every search of the run shares is kept (for a context without
        a shared folder: `state_path(name)`); None when nothing is persisted."""
        if self.shared_dir is None:
            return self.state_path(name)
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        return self.shared_dir / name

    @property
    def shared_seed(self) -> int:
        """The seed of what the run's searches share (its supernets, scores): `run_seed`, else `seed`."""
        return self.seed if self.run_seed is None else self.run_seed

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (with a wall-clock time and the context's log fields) unless the log
        holds the record already, wall-clock fields aside. Records are logged before the state
        they describe is checkpointed, so a resumed search derives again those a kill cut off
        from their checkpoint (and a finished search its selection and pool): written once, its
        log is an uninterrupted search's, nothing lost and nothing repeated."""
        if self.log_path is None or not distributed.writes_here():
            return
        line = json.dumps({"time": round(time.time(), 3), **self.log_fields, **record}, default=_plain)
        identity = _identity(line)
        if identity in self._logged_records(self.log_path):
            return
        with open(self.log_path, "ab") as f:
            f.write(line.encode() + b"\n")
            self._log_size = f.tell()
        self._logged.add(identity)

    def _logged_records(self, path: Path) -> set[str]:
        """The identities of the log's records, read again whenever the log changed since (another
        context of the search or an earlier run wrote it). A last line a kill cut short is
        dropped: its record is derived and written again."""
        path.parent.mkdir(parents=True, exist_ok=True)
        size = path.stat().st_size if path.exists() else 0
        if size != self._log_size:
            text = path.read_bytes() if size else b""
            whole = text.rfind(b"\n") + 1
            if whole < size:
                os.truncate(path, whole)
            self._logged = {_identity(line) for line in text[:whole].decode().splitlines()}
            self._log_size = whole
        return self._logged

    def should_stop(self) -> bool:
        """True once the search's time budget is spent (by the main rank's clock: every rank of
        a distributed search must take the same branch, so this is collective)."""
        return self.deadline is not None and distributed.broadcast_object(time.monotonic() >= self.deadline)

    def input_shape(self) -> tuple[int, ...]:
        """(1, C, D, H, W) of one model input, e.g. for counting FLOPs."""
        grid = self._task.grid
        return (1, self._task.in_channels, grid, grid, grid)

    def cost(self, model: nn.Module, latency: bool | None = None) -> dict[str, float]:
        """A network's cost metrics at one model input: `params`, `flops` and, with `latency`
        (default: `measure_latency`), `latency_ms` (see `latency_ms`); a conditioned network's at
        one setting."""
        model = any_setting(model)
        shape = self.input_shape()
        cost = {"params": float(count_params(model)), "flops": float(count_flops(model, shape))}
        if self.measure_latency if latency is None else latency:
            cost["latency_ms"] = self.latency_ms(model)
        return cost

    def latency_ms(self, model: nn.Module) -> float:
        """Milliseconds of one forward pass of `model` at one model input (batch 1) on the runtime's
        device and under its autocast: the median of LATENCY_RUNS timed passes after a warm-up."""
        seconds = forward_latency(any_setting(model), self.input_shape(), self.runtime.device, LATENCY_RUNS,
                                  autocast=self.runtime.autocast)
        return round(1e3 * seconds, 4)

    @property
    def cascade(self) -> dict[str, Any] | None:
        """The cascade whose full-resolution stage is searched (its `cascade` config), or None."""
        return self._task.cascade

    @property
    def conditioning(self) -> dict[str, Any] | None:
        """The conditioning of the networks searched (`conditioning_spec`), or None."""
        return self._task.conditioning

    def wrap(self, net: nn.Module) -> nn.Module:
        """A network as the task runs it (a cascade's stage: in a Refiner; a conditioned one:
        `Conditioned`); strategies build every network they train or score through this, and
        run it on a batch with `nas_dose.training.engine.forward` (a conditioned network is
        asked for the batch's preferences)."""
        return self._task.wrap(net)

    def targets(self, ids: Iterable[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Reference doses (dose / 70) and possible-dose masks of `ids`, as `evaluate` gives
        their predictions (a cascade's: its patches, stacked)."""
        doses: dict[str, list[np.ndarray]] = {}
        masks: dict[str, list[np.ndarray]] = {}
        for batch in self.loader(ids, train=False, batch_size=1):
            doses.setdefault(batch["id"][0], []).append(batch["target"][0, 0].numpy())
            masks.setdefault(batch["id"][0], []).append(batch["mask"][0, 0].numpy() > 0)
        return per_patient(doses), per_patient(masks)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ids: Iterable[str]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Per-patient validation dose scores (Gy, as nas_dose.train scores) of `model` on `ids`,
        and its predictions there as `nasdose predict` makes them: dose / 70, float32,
        non-negative and zero outside the possible-dose mask. For a cascade's stage, the mean
        score of the patient's fixed patches and those patches' predictions, stacked; for a
        conditioned network, those of the patient's plans, each asked for its preferences."""
        was_training = model.training
        model.eval()
        errors: dict[str, list[float]] = {}
        out: dict[str, list[np.ndarray]] = {}
        for batch in self.loader(ids, train=False, batch_size=1):
            batch = self.runtime.to_device(batch)
            with self.runtime.autocast():
                pred = forward(model, batch)
            for pid, error in zip(batch["id"], dose_errors_gy(pred, batch["target"], batch["mask"]).tolist()):
                errors.setdefault(pid, []).append(error)
            pred = pred.float().clamp_min(0) * batch["mask"]
            for pid, p in zip(batch["id"], pred):
                out.setdefault(pid, []).append(p[0].cpu().numpy())
        model.train(was_training)
        return {pid: float(np.mean(e)) for pid, e in errors.items()}, per_patient(out)


class Strategy(ABC):
    """A search strategy: `run` returns every distinct candidate it scored, best first (a
    strategy may put its own answer first, as differentiable does with its strongest ops)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    uses_references: ClassVar[bool] = False  # whether run() honours ctx.references (sequential diversity)
    # how Candidate.predictions were made, recorded in pool.yaml beside the diversity matrices
    predictions_from: ClassVar[str] = "the networks the strategy scored each candidate with"

    # whether run() builds every network through ctx.wrap and learns from ctx.loader, so that it
    # can search a cascade's full-resolution stage (`search … cascade.coarse=RUN`) and networks
    # conditioned on the planning preferences (`search … conditioning=film`)
    searches_stages: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    def hinge_acted(self) -> bool | None:
        """After `run` with references: whether the diversity hinge acted on the strategy's own
        answer, for a strategy that trains against the references and puts its answer first
        (differentiable with derive=argmax). None (the default): its candidates are ranked by
        score, and `nasdose search` chooses a sequential member among them by score + weight ×
        hinge (strategies/search.py)."""
        return None

    @classmethod
    def check_diversity(cls, options: Any, diversity: DiversityConfig) -> None:
        """Refuse, before any work, a diversity mode this strategy with these options cannot
        search with (sequential needs one that honours ctx.references)."""
        if diversity.mode == "sequential" and not cls.uses_references:
            raise NasDoseError(f"strategy '{cls.name}' cannot search against earlier members; "
                               "use diversity.mode=pool or none")

    @classmethod
    def check_stage_search(cls, diversity: DiversityConfig) -> None:
        """Refuse, before any work, a search of a cascade's stage that this strategy cannot run."""
        if not cls.searches_stages:
            raise NasDoseError(f"strategy '{cls.name}' cannot search a cascade's full-resolution stage "
                               "(cascade.coarse); use evolution, random, optuna, nni or differentiable")

    @classmethod
    def check_conditioned(cls, diversity: DiversityConfig) -> None:
        """Refuse, before any work, a search of conditioned networks that this strategy cannot run."""
        if not cls.searches_stages:
            raise NasDoseError(f"strategy '{cls.name}' cannot search conditioned networks (conditioning); "
                               "use evolution, random, optuna, nni or differentiable")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> Strategy:
        """The strategy with its options validated against its Config dataclass."""
        return cls(from_dict(cls.Config, options))

    @abstractmethod
    def run(self, ctx: SearchContext) -> list[Candidate]:
        """Search; resumable through ctx.state_path."""


S = TypeVar("S", bound=type[Strategy])
# Built-in strategies are imported on first use, so that e.g. NNI is only loaded when asked for.
STRATEGIES: Registry[type[Strategy]] = Registry("strategy", base=Strategy, named=True, builtins={
    "differentiable": f"{__package__}.differentiable",
    "evolution": f"{__package__}.evolution",
    "random": f"{__package__}.random_search",
    "nni": f"{__package__}.nni_backend",
    "optuna": f"{__package__}.optuna_backend",
})


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: make a Strategy available to `nasdose search` as `strategy: name`."""
    return STRATEGIES.register(name)


def get_strategy(name: str) -> type[Strategy]:
    """The Strategy class registered as `name`, or imported from `package.module:Class`."""
    return STRATEGIES.get(name).obj


def list_strategies() -> list[str]:
    """Names of the built-in and registered strategies, sorted."""
    return STRATEGIES.names()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a search log (none if there is none yet), without a last line a kill cut short."""
    if not path.exists():
        return []
    text = path.read_bytes()
    return [json.loads(line) for line in text[:text.rfind(b"\n") + 1].decode().splitlines()]


def _identity(line: str) -> str:
    """A log line as a re-derived record is compared with it: without its wall-clock fields."""
    return json.dumps({k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}, sort_keys=True)


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays and paths in log records."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    return str(value)
