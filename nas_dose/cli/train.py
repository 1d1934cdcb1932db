"""`nasdose train`: arguments -> nas_dose.train.run."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import train
from ..config import add_config_arguments, load_config

STAGE = train


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="nasdose data set")
    parser.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in RUN from its last checkpoint")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> None:
    config = load_config(train.Config, args.config, args.overrides)
    train.run(config, train.Inputs(args.data), args.out, args.resume)
