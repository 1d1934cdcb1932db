"""`nasdose train`: arguments -> nas_dose.train.run."""
from __future__ import annotations

import argparse

from .. import train
from ..config import load_config
from ..models import list_models
from ..registry import PATH_HINT
from .common import add_run_arguments

STAGE = train


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "RUN", "continue the run in RUN from its last checkpoint", "optim.lr=1e-3 epochs=5")
    parser.epilog = f"model.name: {', '.join(list_models())} or {PATH_HINT} (or model.genotype: FILE)"


def main(args: argparse.Namespace) -> None:
    config = load_config(train.Config, args.config, args.overrides)
    train.run(config, train.Inputs(args.data), args.out, args.resume, force=args.force)
