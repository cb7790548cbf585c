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
