"""`nasdose search`: arguments -> nas_dose.strategies.search.run."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import add_config_arguments, load_config
from ..strategies import search

STAGE = search


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="nasdose data set")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="search folder")
    parser.add_argument("--resume", action="store_true", help="continue the search in DIR where it stopped "
                        "(without --config, from DIR/config.yaml; only runtime.* overrides may differ)")
    add_config_arguments(parser)


def main(args: argparse.Namespace) -> None:
    config_path = args.config
    if args.resume and config_path is None and (Path(args.out) / "config.yaml").exists():
        config_path = Path(args.out) / "config.yaml"
    config = load_config(search.Config, config_path, args.overrides)
    search.run(config, search.Inputs(args.data), args.out, args.resume)
