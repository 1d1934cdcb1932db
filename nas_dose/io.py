"""Atomic file output, the output a command holds, and safe loading of YAML, JSON and checkpoints.

Every output is written to a temporary file beside its destination and renamed into place, so
an interrupted or failed run never leaves a half-written file behind. A command that writes
holds its output folder or file (`output_folder`, `output_file`) for its whole run: the path is
checked before any work, a second nasdose process is refused, the temporaries a killed run left
are removed, and a fresh run that is refused leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from .errors import NasDoseError, input_error
from .progress import say, warn

TMP_SUFFIX = ".tmp"
# atomic_path's temporaries: ".NAME." + mkstemp's 8 random characters + ".tmp".
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}" + re.escape(TMP_SUFFIX))
LOCK_NAME = ".nasdose.lock"
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # a network file system without flock
# Files a refused fresh run may have made that a re-run reuses (checkpoints, data sets, caches):
# a folder holding one is kept.
_REUSABLE = (".pt", ".h5")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it to `path` on success.

    On a rank of a distributed run that does not write (`nas_dose.distributed.main_writes`),
    the path is a scratch file that is dropped.
    """
    path = Path(path)
    distributed = sys.modules.get("nas_dose.distributed")  # never imported: one process, it writes
    if distributed is not None and not distributed.writes_here():
        with distributed.discarded(path) as scratch:
            yield scratch
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp creates 0600; give the file the mode a plain open() would
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_yaml(path: str | Path, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


def load_yaml(path: str | Path) -> Any:
    """Load YAML with `safe_load`; a missing or malformed file is a one-line input error."""
    path = Path(path)
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise input_error(path, "file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise input_error(path, f"invalid YAML{where}") from None


def save_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise input_error(path, "file not found") from None
    except json.JSONDecodeError as e:
        raise input_error(path, f"invalid JSON ({e.msg}, line {e.lineno})") from None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save a checkpoint of tensors and plain Python values (loadable with weights_only=True)."""
    import torch  # here, not at the top: `nasdose data` and the configs work without loading torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: no pickled code is ever executed. `mmap`: its
    tensors are mapped, read only when used (for the plain values of many large files)."""
    import torch  # as in save_checkpoint

    path = Path(path)
    if not path.is_file():
        raise input_error(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise input_error(path, f"not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise input_error(path, "checkpoint does not hold a dictionary")
    return state


@contextlib.contextmanager
def shared_file(path: str | Path) -> Iterator[None]:
    """Waits for, then holds, an exclusive `fcntl.flock` on `.NAME.merge.lock` beside `path`: for
    processes that each add their part to one file (read it, merge, write it whole), so that none
    writes over what another added between its read and its write. On a file system without locks
    it holds nothing."""
    path = Path(path)
    fd = os.open(path.parent / f".{path.name}.merge.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------
# The output a command holds.

@contextlib.contextmanager
def output_folder(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Hold `path` as this command's output folder until the block ends.

    Before any work: a path that cannot be a writable folder is a one-line error, and so is a
    folder another nasdose process holds. Temporaries of `atomic_path` left in it by a killed
    run are removed (not in subfolders held on their own). If the block raises a NasDoseError
    and the folder was new or empty, what it created is removed, unless it holds a checkpoint or
    data set to resume from. Under torchrun the main rank holds it, for all ranks.

    `replace` (a run's --force): once held, an earlier run in it (a folder holding the
    config.yaml every run writes) is removed whole, so that nothing of it is resumed or reused.
    """
    with _held(Path(path), folder=True, replace=replace):
        yield Path(path)


@contextlib.contextmanager
def output_file(path: str | Path) -> Iterator[Path]:
    """`output_folder` for one output file (a data set): the lock beside it, only its own
    temporaries removed, the folders made for it removed if it is refused."""
    with _held(Path(path), folder=False):
        yield Path(path)


@contextlib.contextmanager
def _held(path: Path, folder: bool, replace: bool = False) -> Iterator[None]:
    distributed = sys.modules.get("nas_dose.distributed")
    if distributed is None or distributed.world_size() == 1:
        with _Hold(path, folder, replace):
            yield
        return
    with contextlib.ExitStack() as holder:

        def hold() -> None:
            holder.enter_context(_Hold(path, folder, replace))

        distributed.on_main(hold)  # the main rank holds it; a refusal is raised on every rank
        yield


class _Hold:
    """An exclusive `fcntl.flock` on a lock file in the folder (beside a file output), released
    by the kernel when the process dies, so a lock file left by a kill never blocks a re-run."""

    def __init__(self, path: Path, folder: bool, replace: bool = False) -> None:
        self.path, self.folder, self.replace = path, folder, replace
        self.dir = path if folder else path.parent
        self.lock = self.dir / (LOCK_NAME if folder else f".{path.name}.lock")
        self.fd = -1

    def __enter__(self) -> _Hold:
        _check_writable_path(self.path, self.folder)
        self.created = next((p for p in reversed([self.dir, *self.dir.parents]) if not p.exists()), None)
        self.empty = (self.folder and self.created is None
                      and all(p.name == LOCK_NAME for p in self.dir.iterdir()))  # a killed holder's lock
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.fd = self._acquire()
        except OSError as e:
            self._undo_created()
            raise input_error(self.dir, f"cannot write here ({e.strerror or e})") from None
        except NasDoseError:
            self._undo_created()
            raise
        self._remove_stale()
        if self.replace and (self.dir / "config.yaml").is_file():
            self._remove_earlier_run()
        return self

    def _remove_earlier_run(self) -> None:
        say(f"--force: removing the earlier run in {self.dir}")
        for child in self.dir.iterdir():
            if child.name == LOCK_NAME:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in _NO_LOCKS:
                    warn(f"{self.dir}: this file system has no locks; nothing keeps a second nasdose "
                        "process from writing here")
                    return fd
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise input_error(self.path, f"is in use by another nasdose process (pid {pid})") from None
            try:  # the holder before us may have removed the file: lock the one at the path
                if os.stat(self.lock).st_ino == os.fstat(fd).st_ino:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _remove_stale(self) -> None:
        """atomic_path's temporaries of this output: no live process writes them while it is held.
        Inside a folder another command holds (its lock file is there), they are that command's:
        its workers write into subfolders without a lock of their own."""
        if any((p / LOCK_NAME).exists() for p in (self.dir.parents if self.folder else [self.dir, *self.dir.parents])):
            return
        if not self.folder:
            for tmp in self.dir.iterdir():
                found = _TEMPORARY.fullmatch(tmp.name)
                if found and found["name"] == self.path.name:
                    tmp.unlink(missing_ok=True)
            return
        for root, dirs, files in os.walk(self.dir):
            dirs[:] = [d for d in dirs if not os.path.exists(os.path.join(root, d, LOCK_NAME))]
            for name in files:
                found = _TEMPORARY.fullmatch(name)
                if found and not os.path.exists(os.path.join(root, f".{found['name']}.lock")):  # a held file's
                    Path(root, name).unlink(missing_ok=True)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        self.lock.unlink(missing_ok=True)  # before the unlock: a waiter then finds a new file
        os.close(self.fd)
        if isinstance(error, NasDoseError):
            self._leave_nothing()

    def _leave_nothing(self) -> None:
        """After a refusal: remove what this run made where there was nothing (folders it created,
        or the content of a folder that was empty), unless it can be resumed from."""
        if (self.created is None and not self.empty) or self._reusable():
            return
        if self.created is not None:
            self._undo_created()
            return
        for child in self.dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _reusable(self) -> bool:
        """Whether a refused run made something a re-run reuses (a checkpoint, a data set)."""
        if not self.folder:
            return self.path.exists()
        return any(p.suffix in _REUSABLE for p in self.dir.rglob("*") if p.is_file())

    def _undo_created(self) -> None:
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)


def refuse_existing(paths: Iterable[str | Path], force: bool) -> None:
    """An output a command would replace: an error naming the first that exists, unless `force`
    (the command's --force)."""
    for path in paths:
        if Path(path).exists() and not force:
            raise input_error(path, "exists; give --force to replace it")


def _check_writable_path(path: Path, folder: bool) -> None:
    """One-line errors for an output path that cannot be made, before any work."""
    if folder and path.exists() and not path.is_dir():
        raise input_error(path, "is a file, not a folder: choose another --out")
    if not folder and path.is_dir():
        raise input_error(path, "is a folder: name the file to write")
    for parent in [path, *path.parents] if folder else path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise input_error(parent, f"is a file, so it cannot hold {path}")
            if not os.access(parent, os.W_OK | os.X_OK):
                where = "" if parent == path else f", so {path} cannot be made in it"
                raise input_error(parent, f"is not writable{where}")
            return
