"""The `nasdose` command line: one sub-command per pipeline stage, each a thin adapter.

Each module of this package turns its command's arguments into the stage's `Config` and
`Inputs` and calls the stage's `run(config, inputs, out, resume)`: `add_arguments(parser,
common)` and `main(args)`, and `STAGE`, the stage module whose docstring is the command's help.
User errors (`NasDoseError`) become one line on stderr and exit status 1, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..distributed import session
from ..errors import NasDoseError
from ..progress import set_quiet

# (command, module, one-line help) in pipeline order.
COMMANDS: list[tuple[str, str, str]] = [
    ("data", "nas_dose.cli.data", "import OpenKBP data, make synthetic phantoms, summarize a data set"),
    ("train", "nas_dose.cli.train", "train one network (reference model or genotype)"),
    ("predict", "nas_dose.cli.predict", "predict doses with a trained model, write HDF5 and OpenKBP CSVs"),
    ("search", "nas_dose.cli.search", "search architectures and choose an accurate, diverse pool"),
    ("ensemble", "nas_dose.cli.ensemble", "train a pool's members, select and weight them on validation"),
    ("distill", "nas_dose.cli.distill", "distil an ensemble into one compact student; comparison table"),
    ("view", "nas_dose.cli.view", "a conditioned model's preference sliders as one self-contained web page"),
    ("export", "nas_dose.cli.export", "export a model, ensemble or cascade stage to ONNX or torch.export, checked"),
    ("evaluate", "nas_dose.cli.evaluate", "OpenKBP dose and DVH scores, per-structure table and plots"),
    ("pipeline", "nas_dose.cli.pipeline", "run the whole pipeline end to end (synthetic default, or --data)"),
]


# Commands that run over several processes under torchrun (docs/how-to/distributed.md); the others
# refuse to, rather than run N times over the same files.
DISTRIBUTED = {"train", "search", "ensemble", "distill"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; only the chosen command's module is imported (torch loads lazily)."""
    chosen = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="nasdose",
        description="Neural architecture search, ensembles and distillation for 3D radiotherapy "
                    "dose prediction.")
    parser.add_argument("--version", action="version", version=f"nasdose {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines (for scripts)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or status lines (for scripts)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module, help_text in COMMANDS:
        if name != chosen:
            sub.add_parser(name, help=help_text, parents=[common])
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(getattr(mod, "STAGE", mod).__doc__ or help_text).strip(),
                           parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p, common)
        if not p.get_default("func"):
            p.set_defaults(func=mod.main)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting KEY=VALUE overrides come anywhere (`... k=v --flag k2=v2`): argparse
    fills a positional once, so overrides after an option would otherwise be rejected."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(t.startswith("-") or "=" not in t for t in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parse(parser, argv)
    set_quiet(getattr(args, "quiet", False))
    try:
        if "WORLD_SIZE" in os.environ:  # perhaps started by torchrun: join the other processes
            with session(allowed=args.command in DISTRIBUTED):
                args.func(args)
        else:
            args.func(args)
    except NasDoseError as e:
        print(f"nasdose {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nasdose {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0

