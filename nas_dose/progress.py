"""Progress bars and status lines that a single `--quiet` switch turns off for scripts and logs.

Warnings are not progress: `warn` prints them to stderr even when quiet, so a script that runs
`-q` still sees that a result needs a second look.
"""
from __future__ import annotations

import sys
from typing import Iterable, NoReturn, TypeAlias, TypeVar, overload

from tqdm.auto import tqdm

T = TypeVar("T")
Bar: TypeAlias = "tqdm[NoReturn]"  # a bar without an iterable, advanced with .update()
_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


@overload
def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", leave: bool = False) -> tqdm[T]: ...


@overload
def progress(iterable: None = None, total: int | None = None, desc: str = "",
             leave: bool = False) -> Bar: ...


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "",
             leave: bool = False) -> tqdm[T] | Bar:
    """A tqdm bar (to stderr) unless quiet; usable as an iterator or with `.update()`."""
    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=_QUIET, dynamic_ncols=True)


def say(message: str) -> None:
    """Print a status line unless quiet."""
    if not _QUIET:
        print(message, flush=True)


def warn(message: str) -> None:
    """Print a warning line to stderr, quiet or not."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
