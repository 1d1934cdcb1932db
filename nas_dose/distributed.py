"""Runs over several processes started by `torchrun`, in one place: nothing else talks to
torch.distributed or reads torchrun's variables (the CLI only looks whether WORLD_SIZE is set,
so that a plain run does not import torch for nothing).

`torchrun --nproc_per_node=N -m nas_dose COMMAND ...` starts N processes (ranks) with RANK,
WORLD_SIZE and LOCAL_RANK in their environment; `session()` (entered by the CLI) joins them in a
process group. Without torchrun every function here answers as the only rank of a world of one,
so a single process needs nothing from this module.

Work is split in two ways:

- collective: every rank runs the same code on its share of each batch (`ShardedBatches`);
  gradients are averaged (`data_parallel`, `average_gradients`) and sums all-reduced, so every
  rank holds the same state. Only the main rank (0) writes files (`main_writes`); a step that
  checks files and then writes them runs on the main rank alone (`on_main`).
- independent: `shard(items)` is this rank's share of a list of separate jobs, which it runs
  `alone()` (a world of one that writes its own files); `gather_objects` puts every rank's
  results back in the order of the list, on every rank. `map_shards` does all three.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from .errors import NasDoseError
from .progress import is_quiet, set_quiet

T = TypeVar("T")
R = TypeVar("R")

# Independent work (an ensemble member) keeps the other ranks waiting at the next gather for as
# long as it runs; a rank that dies is noticed by torchrun, which stops the others, not by this.
TIMEOUT = datetime.timedelta(hours=48)

_alone = 0  # depth of alone() blocks: inside one this rank is a world of one
_main_writes = 0  # depth of main_writes() blocks: inside one only the main rank writes files


@dataclass(frozen=True)
class Launch:
    """This process's place as torchrun set it: rank among world_size, GPU index on its node."""

    rank: int
    world_size: int
    local_rank: int


def _env_int(name: str, default: int, low: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise NasDoseError(f"environment variable {name}={raw!r}: expected an integer (torchrun sets it)") from None
    if value < low:
        raise NasDoseError(f"environment variable {name}={value}: must be at least {low}")
    return value


def launch() -> Launch:
    """RANK, WORLD_SIZE and LOCAL_RANK from the environment (a world of one without torchrun)."""
    world = _env_int("WORLD_SIZE", 1, 1)
    rank = _env_int("RANK", 0, 0)
    if rank >= world:
        raise NasDoseError(f"environment variable RANK={rank}: must be below WORLD_SIZE={world}")
    return Launch(rank, world, _env_int("LOCAL_RANK", 0, 0))


def local_world_size() -> int:
    """Processes of this run on this node (LOCAL_WORLD_SIZE, set by torchrun; 1 without): they
    share the node's cores and shared memory."""
    return _env_int("LOCAL_WORLD_SIZE", 1, 1)


def cuda_index() -> int:
    """The GPU of this process: LOCAL_RANK (one process per GPU), checked against the node's GPUs."""
    index = launch().local_rank
    if index >= torch.cuda.device_count():
        raise NasDoseError(f"LOCAL_RANK={index} but this node has {torch.cuda.device_count()} CUDA device(s): "
                           "start at most one process per GPU (torchrun --nproc_per_node)")
    return index


@contextlib.contextmanager
def session(allowed: bool = True) -> Iterator[None]:
    """A command's run: under torchrun the ranks join a process group (NCCL for CUDA tensors,
    Gloo for CPU ones and for objects), only the main rank prints and writes; left on exit.

    `allowed` False: the command runs in one process only, and torchrun is an error. Nested
    sessions (a test's entry script calling the CLI) share the outer one's group.
    """
    env = launch()
    if env.world_size > 1 and not allowed:
        raise NasDoseError(f"runs in one process; start it without torchrun (WORLD_SIZE={env.world_size})")
    owner = env.world_size > 1 and not dist.is_initialized()
    if owner:
        if torch.cuda.is_available():
            torch.cuda.set_device(cuda_index())
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    quiet = is_quiet()
    set_quiet(quiet or not is_main())
    try:
        with main_writes():
            yield
    finally:
        set_quiet(quiet)
        if owner:
            dist.destroy_process_group()


def world_size() -> int:
    """How many ranks share the work here (1 without torchrun and inside `alone()`)."""
    if _alone or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def rank() -> int:
    """This process's rank among `world_size()` (0 without torchrun and inside `alone()`)."""
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this rank writes the shared files and prints (rank 0, or a rank working alone)."""
    return rank() == 0


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside, this rank is a world of one: no collectives, no sharding, and it writes its own
    files. For the independent jobs `shard` gave it, e.g. training one ensemble member."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


@contextlib.contextmanager
def main_writes() -> Iterator[None]:
    """Inside, only the main rank writes files: the atomic writes of `nas_dose.io` on the other
    ranks go to a scratch file that is dropped, and `writes_here()` tells appending writers (logs)
    whether to write. After a normal exit every rank has waited for the others, so the files
    written inside are there for all of them."""
    global _main_writes
    _main_writes += 1
    try:
        yield
    finally:
        _main_writes -= 1
    barrier()


def writes_here() -> bool:
    """Whether this process writes files now (not a rank other than the main one in `main_writes`)."""
    return not _main_writes or is_main()


@contextlib.contextmanager
def discarded(path: Path) -> Iterator[Path]:
    """A scratch path named like `path`, deleted on exit: where a rank that does not write puts
    what it would have written."""
    with tempfile.TemporaryDirectory(prefix="nasdose-rank") as scratch:
        yield Path(scratch) / path.name


def barrier() -> None:
    """Wait until every rank is here."""
    if world_size() > 1:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "mean", "max"] = "sum") -> torch.Tensor:
    """`tensor` (in place, also returned) combined over the ranks: sum, mean or max."""
    if world_size() > 1:
        dist.all_reduce(tensor, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= world_size()
    return tensor


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` (picklable; tensors on the CPU) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def on_main(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """`fn(*args, **kwargs)` run by the main rank alone, its result (or its NasDoseError) on every
    rank: for steps that check files and then write them, which two ranks would race on."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    error: NasDoseError | None = None
    outcome: tuple[str, Any] | None = None
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except NasDoseError as e:
            error, outcome = e, ("error", str(e))
    kind, value = cast("tuple[str, Any]", broadcast_object(outcome))  # the main rank's, never None
    if error is not None:
        raise error
    if kind == "error":
        raise NasDoseError(value)
    return value


def _share(items: Sequence[T], rank_: int, world: int, even: bool) -> list[T]:
    """Items rank_, rank_ + world, …; `even` first repeats items from the start until every rank
    gets as many."""
    items = list(items)
    if even and items and len(items) % world:
        items += [items[i % len(items)] for i in range(world - len(items) % world)]
    return items[rank_::world]


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of independent jobs: items rank, rank + world, … (round robin, so that
    neighbours in the list, often of similar cost, go to different ranks)."""
    return _share(items, rank(), world_size(), even=False)


def gather_objects(mine: Sequence[T]) -> list[T]:
    """Every rank's results for its `shard(items)` (picklable), back in the order of `items`,
    on every rank."""
    world = world_size()
    if world == 1:
        return list(mine)
    parts: list[list[T]] = [[] for _ in range(world)]
    dist.all_gather_object(parts, list(mine))
    return [parts[i % world][i // world] for i in range(sum(len(p) for p in parts))]


def map_shards(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[fn(item) for item in items], each run by one rank alone; the results on every rank.

    A NasDoseError on a rank is raised on every rank (the first in item order), so that all of
    them stop with the same message instead of waiting for the one that gave up; a rank skips
    its jobs after its first error.
    """
    results: list[tuple[bool, Any]] = []
    for item in shard(items):
        if results and not results[-1][0]:
            results.append((False, None))
            continue
        try:
            with alone():
                results.append((True, fn(item)))
        except NasDoseError as e:
            if world_size() == 1:
                raise
            results.append((False, str(e)))
    gathered = gather_objects(results)
    failed = [value for ok, value in gathered if not ok and value is not None]
    if failed:
        raise NasDoseError(failed[0])
    return [value for _, value in gathered]


class ShardedBatches(Sampler[list[Any]]):
    """This rank's batches of the keys `sampler` yields, for a DataLoader's `batch_sampler`:
    rank r takes keys r, r + world, … of the same order, so the batches of all ranks together
    are those one process takes with `batch_size`.

    even (training): every rank gets batch_size / world keys per step and as many steps; when
    the count is not a multiple of world, the first keys are repeated to fill the last step.
    Otherwise (evaluation) each key goes to exactly one rank, some perhaps getting a batch less;
    sums over the batches are then all-reduced.
    """

    def __init__(self, sampler: Iterable[Any], batch_size: int, even: bool, drop_last: bool = False,
                 rank_: int | None = None, world: int | None = None) -> None:
        self.sampler, self.batch_size, self.even, self.drop_last = sampler, batch_size, even, drop_last
        self.world = world_size() if world is None else world
        self.rank = rank() if rank_ is None else rank_
        if even and batch_size % self.world:
            raise NasDoseError(f"batch size {batch_size} does not split evenly over {self.world} processes "
                               f"(torchrun): use a multiple of {self.world}")
        self.per_rank = batch_size // self.world if even else -(-batch_size // self.world)

    def _keys(self, order: list[Any]) -> list[Any]:
        if self.drop_last:
            order = order[:len(order) // self.batch_size * self.batch_size]
        return _share(order, self.rank, self.world, self.even)

    def __iter__(self) -> Iterator[list[Any]]:
        # A generator: the order is drawn at the first batch, as torch's BatchSampler draws it, so
        # that a shared generator's draws come in the same sequence.
        keys = self._keys(list(self.sampler))
        for i in range(0, len(keys), self.per_rank):
            yield keys[i:i + self.per_rank]

    def __len__(self) -> int:
        keys = len(self._keys(list(range(len(self.sampler)))))  # type: ignore[arg-type]
        return -(-keys // self.per_rank)


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in DistributedDataParallel when several ranks train it (its gradients are averaged
    over the ranks during backward, and rank 0's weights are copied to all first); else itself.

    A static graph: every step uses the same parameters, which lets a genotype leave some unused
    (an op followed by `zero`), where plain DDP would wait for their gradients forever.
    """
    if world_size() == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   static_graph=True)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of `params` over the ranks in one all-reduce, as DDP does: for steps
    that update one part of a model while the other is frozen, which DDP cannot follow."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
