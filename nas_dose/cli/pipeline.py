"""`nasdose pipeline`: arguments -> a recipe -> nas_dose.pipeline.run."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .. import pipeline
from ..config import int_at_least
from ..errors import NasDoseError
from ..recipe import load_recipe
from .common import add_force_argument

STAGE = pipeline


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--data", type=Path, metavar="SRC",
                        help="your data instead of the synthetic phantoms: an OpenKBP tree (imported at "
                             "--grid) or a data set from nasdose data import; it needs train and validation "
                             "patients with a dose")
    parser.add_argument("--patients", type=int_at_least(1),
                        help="synthetic patients with a dose (the recipe's synthetic.patients)")
    parser.add_argument("--unlabeled", type=int_at_least(0),
                        help="more synthetic patients without a dose, which the student learns from the "
                             "teacher alone (the recipe's synthetic.unlabeled)")
    parser.add_argument("--grid", type=int_at_least(1),
                        help="grid size (the recipe's grid, else synthetic.grid or, with --data, real.grid)")
    parser.add_argument("--epochs", type=int_at_least(1),
                        help="epochs of each ensemble member, the student and its baseline; the reference "
                             "U-Net half as many (the recipe's epochs, else synthetic.epochs or real.epochs)")
    parser.add_argument("--seed", type=int, help="random seed of every stage (the recipe's seed)")
    parser.add_argument("--config", type=Path, metavar="RECIPE.yaml",
                        help="a recipe laid over the default one (e.g. configs/openkbp_cpu.yaml: a coarse "
                             "U-Net and its full-resolution cascade)")
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds (for tests)")
    add_force_argument(parser, "the earlier pipeline run in DIR, starting afresh, even one with the same "
                               "settings (which otherwise resumes)")


def main(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.config, args.quick)
    if args.data is not None:
        used = [flag for flag, value in (("--patients", args.patients), ("--unlabeled", args.unlabeled))
                if value is not None]
        if used:
            raise NasDoseError(f"{' and '.join(used)}: for the synthetic data set only, not with --data "
                               "(an unlabeled/ folder in an OpenKBP tree holds patients without a plan)")
    synthetic = replace(recipe.synthetic, **{k: v for k, v in (("patients", args.patients),
                                                                ("unlabeled", args.unlabeled)) if v is not None})
    flags = {k: v for k, v in (("grid", args.grid), ("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    print(pipeline.run(replace(recipe, synthetic=synthetic, **flags), pipeline.Inputs(args.data), args.out,
                       force=args.force))
