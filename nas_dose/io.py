"""Atomic file output and safe loading of YAML, JSON and checkpoints.

Every output is written to a temporary file beside its destination and renamed into place, so
an interrupted or failed run never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import input_error


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`: no pickled code is ever executed."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise input_error(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise input_error(path, f"not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise input_error(path, "checkpoint does not hold a dictionary")
    return state
