"""Arguments that several commands share, worded once."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import add_config_arguments


def add_force_argument(parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, what: str) -> None:
    """--force: a command that writes refuses an existing output (one line naming it) without it."""
    parser.add_argument("--force", action="store_true", help=f"replace {what} if there is one (without --force: "
                                                              "an error)")


def add_run_arguments(parser: argparse.ArgumentParser, out: str, resume: str, example: str) -> None:
    """--data, --out (metavar `out`), --resume (help `resume`) or --force, and the config arguments
    (`example`: overrides for the help)."""
    parser.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="nasdose data set")
    parser.add_argument("--out", type=Path, required=True, metavar=out, help="output folder")
    either = parser.add_mutually_exclusive_group()
    either.add_argument("--resume", action="store_true", help=resume)
    add_force_argument(either, f"the earlier run in {out}, starting afresh,")
    add_config_arguments(parser, example)
