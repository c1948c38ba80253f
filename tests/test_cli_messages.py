"""The CLI as an admin meets it: every --help works, and mistakes get one clear line, no traceback."""
from __future__ import annotations

import argparse

import pytest

from node import cli


def _commands() -> list[list[str]]:
    """Every subcommand (and sub-subcommand) of ``srnode``, and each train/eval family."""
    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found += [prefix + [name], *walk(child, prefix + [name])]
        return found

    commands = walk(cli.build_parser(), [])
    families = [[kind, family] for kind in ("train", "eval") for family in cli.FAMILIES]
    return commands + families


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_subcommand_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out
