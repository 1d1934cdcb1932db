"""`nasdose ensemble`: arguments -> nas_dose.ensemble.run."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import ensemble
from ..config import load_config
from .common import add_run_arguments

STAGE = ensemble


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", type=Path, metavar="POOL.yaml", help="pool file written by nasdose search")
    add_run_arguments(parser, "DIR", "continue the run in DIR: finished members are reused, a half-trained one resumes",
                      "train.epochs=20 parallel=2")


def main(args: argparse.Namespace) -> None:
    config = load_config(ensemble.Config, args.config, args.overrides)
    ensemble.run(config, ensemble.Inputs(args.pool, args.data), args.out, args.resume, force=args.force)
