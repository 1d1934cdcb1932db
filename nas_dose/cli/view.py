"""`nasdose view`: arguments -> nas_dose.view.run (a page file, with --out) or nas_dose.view.serve."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .. import view
from ..config import ConfigError, add_config_arguments, int_at_least, load_config
from .common import add_force_argument

STAGE = view


def add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL",
                        help="a conditioned training run folder (its best.pt), checkpoint or ensemble .yaml")
    parser.add_argument("--data", type=Path, required=True, metavar="DATA.h5", help="nasdose data set")
    parser.add_argument("--out", type=Path, default=None, metavar="PAGE.html",
                        help="write one self-contained page of precomputed settings (without it: serve the page "
                             "live on 127.0.0.1, predicting each setting the sliders ask for; Ctrl-C stops)")
    parser.add_argument("--port", type=int_at_least(0), default=None, metavar="P",
                        help="the live server's port (default 0: a free one; the URL is printed)")
    parser.add_argument("--patient", metavar="ID", default=None, help="the patient shown (default: the first)")
    parser.add_argument("--steps", type=int_at_least(2), default=None, metavar="N",
                        help="with --out: precomputed values per preference (default 5: 25 predictions for two)")
    add_force_argument(parser, "PAGE.html")
    add_config_arguments(parser, "runtime.device=cpu span=range")


def main(args: argparse.Namespace) -> None:
    if args.out is None and args.steps is not None:
        raise ConfigError("--steps: precomputed settings are for a page written with --out; a live page "
                          "predicts each setting the sliders ask for")
    if args.out is not None and args.port is not None:
        raise ConfigError("--port: a page written with --out is not served; drop one of them")
    config = load_config(view.Config, args.config, args.overrides)
    flags = {k: v for k, v in (("patient", args.patient), ("steps", args.steps), ("port", args.port))
             if v is not None}
    config = replace(config, **flags)
    config.validate()
    if args.out is None:
        view.serve(config, view.Inputs(args.model, args.data))
    else:
        view.run(config, view.Inputs(args.model, args.data), args.out, force=args.force)
