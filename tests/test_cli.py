"""The console script: subcommands are listed, and a missing optional package is named clearly."""

import pytest

from inplace_abn import cli


def test_help_lists_every_tool(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out


def test_missing_optional_package_is_named(monkeypatch, capsys):
    from inplace_abn.tools import demo

    def needs_numpy(args):
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

    monkeypatch.setattr(demo, "main", needs_numpy)
    assert cli.main(["demo"]) == 2
    assert "needs the optional package 'numpy'" in capsys.readouterr().err


def test_other_import_errors_are_not_hidden(monkeypatch):
    from inplace_abn.tools import demo

    def broken(args):
        raise ModuleNotFoundError("No module named 'inplace_abn.nothing'", name="inplace_abn.nothing")

    monkeypatch.setattr(demo, "main", broken)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["demo"])
