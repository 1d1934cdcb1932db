"""Arguments that several commands share, worded once."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import add_config_arguments


def add_run_arguments(parser: argparse.ArgumentParser, out: str, resume: str) -> None:
    """--data, --out (metavar `out`), --resume (help `resume`) and the config arguments."""
    parser.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="nasdose data set")
    parser.add_argument("--out", type=Path, required=True, metavar=out, help="output folder")
    parser.add_argument("--resume", action="store_true", help=resume)
    add_config_arguments(parser)
