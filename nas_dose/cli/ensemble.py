"""`nasdose ensemble`: arguments -> nas_dose.ensemble.run."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import ensemble
from ..config import add_config_arguments, load_config

STAGE = ensemble


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", type=Path, metavar="POOL.yaml", help="pool file written by nasdose search")
    parser.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="nasdose data set")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in DIR: finished members are reused, a half-trained one resumes")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> None:
    config = load_config(ensemble.Config, args.config, args.overrides)
    ensemble.run(config, ensemble.Inputs(args.pool, args.data), args.out, args.resume)
