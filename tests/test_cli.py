"""The command line as a whole: every command documents itself with overrides that work; -q
anywhere; shipped configs by name; errors are one line."""
import argparse
import importlib
import re

import pytest

from nas_dose import cli
from nas_dose.config import load_config
from nas_dose.data.preferences import NAMES as PREFERENCE_NAMES
from nas_dose.progress import say, set_quiet, warn


@pytest.mark.parametrize("command", [name for name, _, _ in cli.COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: nasdose {command}") and "--quiet" in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name, _, _ in cli.COMMANDS)


def test_user_error_is_one_line_and_exit_1(tmp_path, capsys):
    rc = cli.main(["data", "info", str(tmp_path / "absent.h5")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("nasdose data: error: ") and "absent.h5" in err


def test_overrides_may_follow_options(tmp_path):
    """`k=v --flag k2=v2`: every override reaches the command, in order."""
    parser = cli.build_parser(["train"])
    args = cli.parse(parser, ["train", "--data", "d.h5", "--out", str(tmp_path), "epochs=2", "-q", "optim.lr=0.1"])
    assert args.overrides == ["epochs=2", "optim.lr=0.1"]


def test_unknown_argument_is_still_rejected(capsys):
    parser = cli.build_parser(["train"])
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(parser, ["train", "--data", "d.h5", "--out", "o", "epochs=2", "--bogus", "lr=1"])
    assert exit_info.value.code == 2 and "--bogus" in capsys.readouterr().err


# `KEY=VALUE` words of a help text that are no overrides: the placeholder, the arguments of a
# student SPEC (`unet3d:widths=8,16,32:norm=batch`, `genotype.yaml:width=0.5`), and the planning
# preferences `predict --preference oar=0.7,hi=0.1` asks for.
NOT_OVERRIDES = {"key", "widths", "norm", "width", *PREFERENCE_NAMES}
# not after ':', where `key=value` is an option of a SPEC (unet3d:widths=8, search:max_flops=3e9)
OVERRIDE = re.compile(r"(?<![\w./:-])([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*)=([^\s,;:)`'\]]+)")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


@pytest.mark.parametrize("command", [name for name, _, _ in cli.COMMANDS])
def test_every_override_a_help_shows_works(command):
    """Each `key=value` in a command's --help (description, options, examples) is an override its
    config accepts; a command without a config shows none."""
    sub = subparsers(cli.build_parser([command]))[command]
    texts = [sub.format_help(), *(p.format_help() for p in subparsers(sub).values())]
    shown = {m.group(0) for text in texts for m in OVERRIDE.finditer(text) if m.group(1) not in NOT_OVERRIDES}
    if not any(a.dest == "overrides" for a in sub._actions):
        assert not shown, f"nasdose {command} --help shows overrides it does not take: {sorted(shown)}"
        return
    assert shown, f"nasdose {command} --help shows no example override"
    stage = importlib.import_module(dict((n, m) for n, m, _ in cli.COMMANDS)[command]).STAGE
    for override in sorted(shown):
        load_config(stage.Config, overrides=[override])  # a ConfigError names the override


@pytest.mark.parametrize("where", ["before the command", "after it", "at the end"])
def test_quiet_anywhere(where, tmp_path, capsys):
    out = tmp_path / "d.h5"
    argv = {"before the command": ["-q", "data", "synth", str(out)], "after it": ["data", "-q", "synth", str(out)],
            "at the end": ["data", "synth", str(out), "--patients", "2", "--grid", "16", "-q"]}[where]
    if where != "at the end":
        argv += ["--patients", "2", "--grid", "16"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""


def test_quiet_silences_progress_not_warnings(capsys):
    set_quiet(True)
    say("epoch 1")
    warn("the teacher has little to teach")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "warning: the teacher has little to teach\n"


def test_configs_are_addressable_by_name(tmp_path):
    parser = cli.build_parser(["search"])
    args = cli.parse(parser, ["search", "--data", "d.h5", "--out", str(tmp_path), "--config", "search_evolution"])
    config = load_config(importlib.import_module("nas_dose.strategies.search").Config, args.config)
    assert config.strategy == "evolution"
