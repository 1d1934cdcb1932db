"""The command line as a whole: every command documents itself; errors are one line."""
import pytest

from nas_dose import cli


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
