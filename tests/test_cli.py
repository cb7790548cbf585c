import subprocess
import sys

import pytest

from megapack.cli import SUBCOMMANDS


def test_module_entry_point_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "megapack", "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help_exits_zero(name):
    out = subprocess.run([sys.executable, "-m", "megapack", name, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: megapack " + name in out.stdout


def _parsers():
    """(name, parser) of every subcommand, and of convert's two directions."""
    import argparse

    from megapack.cli import build_parser

    def subs(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield f"{prefix}{name}", child
                    yield from subs(child, f"{prefix}{name} ")

    return list(subs(build_parser(), ""))


def test_every_flag_has_help_and_help_shows_defaults():
    import argparse

    for name, parser in _parsers():
        text = " ".join(parser.format_help().split())  # help lines wrap
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"megapack {name}: {action.option_strings or action.dest} has no help text"
            switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))  # no default shown
            shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings and not switch
            if shown:
                flag = action.option_strings[-1]
                after = text[text.index(flag):]
                assert f"default: {action.default}" in after or f"default {action.default}" in after, (name, flag)
