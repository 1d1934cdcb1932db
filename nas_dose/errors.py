"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""
from __future__ import annotations

from pathlib import Path


class NasDoseError(Exception):
    """A problem with the user's input (file, config, genotype), not a bug in nasdose."""


def input_error(path: str | Path, problem: str) -> NasDoseError:
    """Build the standard 'FILE: problem' error."""
    return NasDoseError(f"{path}: {problem}")
