"""Independent trainings side by side, each in its own process, on the cores of one machine.

Small networks (a 16³ phantom, a compact student) gain little from a second CPU thread, so two
trainings in two single-thread processes beat the same two in turn on both threads
(benchmarks/bench_parallel.py measures it). `run_side_by_side` spreads jobs over `workers`
processes and hands back their results in
the jobs' order, or raises the first error (a NasDoseError as itself) at once, ending the
others. Each job must be a top-level function whose arguments pickle, and must set its own
threads (`worker_threads` shares them out: a process left to torch's default would take every
core); workers run quietly (their progress bars would interleave), and the caller says what
finished.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from . import distributed
from .errors import NasDoseError
from .progress import set_quiet

R = TypeVar("R")


def _start_worker(parent: int) -> None:
    set_quiet(True)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this worker once its parent is gone (killed, say, by a job scheduler's SIGTERM, which
    reaches the parent alone): an orphan would go on training and writing the run folder beside
    the resumed run."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def worker_threads(workers: int, threads: int | None) -> int:
    """Threads for each of `workers` processes: `threads` (default: every core) shared out."""
    total = threads if threads is not None else (os.cpu_count() or 1)
    return max(1, total // workers)


def run_side_by_side(fn: Callable[..., R], jobs: Sequence[tuple[Any, ...]], workers: int,
                     done: Callable[[int, R], None] | None = None) -> list[R]:
    """[fn(*job) for job in jobs], up to `workers` at once in separate processes.

    `done(i, result)` is called in this process as job i finishes. With one worker, or one job,
    the jobs run here, one after another. Not under torchrun (whose ranks already share the work).
    """
    if workers < 1:
        raise NasDoseError(f"side-by-side trainings: need at least 1 worker, got {workers}")
    if workers > 1 and distributed.world_size() > 1:
        raise NasDoseError("side-by-side trainings (parallel > 1) cannot run under torchrun; "
                           "set parallel=1, the ranks already share the work")
    workers = min(workers, len(jobs))
    if workers <= 1:
        results = []
        for i, job in enumerate(jobs):
            results.append(fn(*job))
            if done is not None:
                done(i, results[-1])
        return results
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools or open HDF5 files
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),))
    futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
    try:
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in sorted(finished, key=futures.__getitem__):
                error = future.exception()
                if error is not None:
                    raise error
                if done is not None:
                    done(futures[future], future.result())
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    return [future.result() for future in sorted(futures, key=futures.__getitem__)]


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the jobs not started and end the running ones now: after an error (or Ctrl-C) the
    command must not wait minutes for the other trainings, which resume from their checkpoints."""
    running = list((getattr(pool, "_processes", None) or {}).values())  # no public way to end them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in running:
        process.terminate()
