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
