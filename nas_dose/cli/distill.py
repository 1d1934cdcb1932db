"""`nasdose distill`: arguments -> nas_dose.distill.distill.run."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from nas_dose.distill import distill

from ..config import load_config
from .common import add_run_arguments

STAGE = distill


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("teacher", type=Path, metavar="ENSEMBLE.yaml",
                        help="ensemble file written by nasdose ensemble (or a run folder / checkpoint)")
    parser.add_argument("--student", metavar="SPEC",
                        help="the student's architecture: NAME:key=value..., FILE.yaml, GENOTYPE.yaml:width=F or "
                             "search:max_flops=N (the most accurate searched genotype within the limit; see above)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                        help="also train the student's architecture without distillation (default: on)")
    parser.add_argument("--export", action="store_true", default=None,
                        help="write DIR/student.pt2 (torch.export) of the student")
    parser.add_argument("--teacher-cache", type=Path, metavar="FILE",
                        help="teacher predictions file to reuse or write (default: DIR/teacher.h5)")
    add_run_arguments(parser, "DIR", "continue the run in DIR", "train.epochs=20 alpha_teacher=0.5")


def main(args: argparse.Namespace) -> None:
    config = load_config(distill.Config, args.config, args.overrides)
    flags = {k: v for k, v in (("student", args.student), ("baseline", args.baseline), ("export", args.export))
             if v is not None}
    distill.run(replace(config, **flags), distill.Inputs(args.teacher, args.data, args.teacher_cache), args.out,
                args.resume, force=args.force)
