"""`nasdose export`: arguments -> nas_dose.export.run."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import get_args

from .. import export
from ..config import add_config_arguments, load_config
from .common import add_force_argument

STAGE = export


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="MODEL",
                        help="training run folder (its best.pt), a checkpoint file or an ensemble .yaml")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--format", choices=get_args(export.Format),
                        help="onnx (default) or pt2 (torch.export)")
    add_force_argument(parser, "the export in DIR")
    add_config_arguments(parser, "grid=32 dynamic=false")


def main(args: argparse.Namespace) -> None:
    config = load_config(export.Config, args.config, args.overrides)
    flags = {"format": args.format} if args.format is not None else {}
    export.run(replace(config, **flags), export.Inputs(args.model), args.out, force=args.force)
