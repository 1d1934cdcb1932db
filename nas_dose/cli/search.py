"""`nasdose search`: arguments -> nas_dose.strategies.search.run."""
from __future__ import annotations

import argparse
from pathlib import Path

from nas_dose.search_spaces import list_spaces
from nas_dose.strategies import list_strategies, search

from ..config import load_config
from ..registry import PATH_HINT
from .common import add_run_arguments

STAGE = search


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "DIR", "continue the search in DIR where it stopped (without --config, from "
                      "DIR/config.yaml; only runtime.* and logging.* overrides may differ)",
                      "strategy=evolution pool_size=4")
    parser.epilog = (f"space: {', '.join(list_spaces())} or {PATH_HINT}\n"
                     f"strategy: {', '.join(list_strategies())} or {PATH_HINT}")


def main(args: argparse.Namespace) -> None:
    config_path = args.config
    if args.resume and config_path is None and (Path(args.out) / "config.yaml").exists():
        config_path = Path(args.out) / "config.yaml"
    config = load_config(search.Config, config_path, args.overrides)
    search.run(config, search.Inputs(args.data), args.out, args.resume, force=args.force)
