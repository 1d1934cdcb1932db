"""`nasdose evaluate`: arguments -> nas_dose.evaluate.run."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import evaluate
from ..config import int_at_least
from ..data.store import SPLITS
from .common import add_force_argument

STAGE = evaluate


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", type=Path, required=True, metavar="PRED",
                        help="folder of submission CSVs (pt_N.csv) or a predictions HDF5")
    parser.add_argument("--ref", type=Path, required=True, metavar="DATA",
                        help="OpenKBP folder (CSV or npz layout) or a data set HDF5")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output folder for metrics.json and plots/")
    parser.add_argument("--split", choices=SPLITS,
                        help="score exactly the reference patients of this split "
                             "(default: every predicted patient)")
    parser.add_argument("--plots", type=int_at_least(0), default=3, metavar="N",
                        help="plot the first N patients (default %(default)s)")
    add_force_argument(parser, "the scores in DIR")


def main(args: argparse.Namespace) -> None:
    evaluate.run(evaluate.Config(split=args.split, plots=args.plots), evaluate.Inputs(args.pred, args.ref), args.out,
                 force=args.force)
