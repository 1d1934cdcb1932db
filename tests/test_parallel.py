"""Trainings side by side (nas_dose.parallel): results in the jobs' order, errors come back as
they were raised, one worker runs in this process, torchrun is refused, and no worker outlives
its parent."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nas_dose import distributed, parallel
from nas_dose.errors import NasDoseError


def tag_and_pid(tag: str) -> tuple[str, int]:
    return tag, os.getpid()


def test_results_come_back_in_order_from_other_processes():
    finished = []
    results = parallel.run_side_by_side(tag_and_pid, [("a",), ("b",), ("c",)], workers=2,
                                        done=lambda i, r: finished.append((i, r[0])))
    assert [r[0] for r in results] == ["a", "b", "c"]
    assert os.getpid() not in {r[1] for r in results}
    assert sorted(finished) == [(0, "a"), (1, "b"), (2, "c")]


def test_one_worker_runs_the_jobs_here_in_order():
    finished = []
    results = parallel.run_side_by_side(tag_and_pid, [("a",), ("b",)], workers=1,
                                        done=lambda i, r: finished.append(i))
    assert results == [("a", os.getpid()), ("b", os.getpid())]
    assert finished == [0, 1]


def test_an_error_in_a_worker_is_raised_here_as_itself_without_waiting_for_the_others():
    """The other job would sleep ten minutes: it is ended, not waited for."""
    start = time.monotonic()
    with pytest.raises(NasDoseError, match="member m1: bad genotype"):
        parallel.run_side_by_side(fail_or_sleep, [(600,), ("member m1: bad genotype",), (600,)], workers=2)
    assert time.monotonic() - start < 120


def fail_or_sleep(what: str | int) -> None:
    if isinstance(what, int):
        time.sleep(what)
    else:
        raise NasDoseError(what)


def test_refused_under_torchrun_and_with_no_worker(monkeypatch):
    with pytest.raises(NasDoseError, match="at least 1 worker"):
        parallel.run_side_by_side(tag_and_pid, [("a",)], workers=0)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(NasDoseError, match="torchrun"):
        parallel.run_side_by_side(tag_and_pid, [("a",), ("b",)], workers=2)


@pytest.mark.parametrize("workers, threads, cores, expected", [
    (2, None, 2, 1), (2, None, 16, 8), (3, 8, 16, 2), (4, 2, 16, 1), (1, None, 6, 6)])
def test_worker_threads_share_the_cores(monkeypatch, workers, threads, cores, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert parallel.worker_threads(workers, threads) == expected


def test_workers_end_when_their_parent_is_killed(tmp_path):
    """A SIGTERM to the parent alone (a job scheduler's) leaves no orphan training on."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from nas_dose.parallel import run_side_by_side\n"
        "if __name__ == '__main__':\n"
        "    run_side_by_side(time.sleep, [(600,), (600,)], workers=2)\n")
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(children(parent.pid)) < 2:
            time.sleep(0.2)
        workers = children(parent.pid)
        assert len(workers) >= 2
    finally:
        parent.kill()
        parent.wait()
    # A worker still importing torch when its parent dies (seconds on a loaded machine) only
    # checks for it afterwards: wait long, leaving as soon as they are gone.
    deadline = time.time() + 90
    while time.time() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)


def children(pid: int) -> list[int]:
    """The spawned worker processes of `pid` (Linux /proc; its resource tracker left out)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in text and b"multiprocessing.spawn" in cmdline:
            found.append(int(status.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended; it waits for its (new) parent to reap it
