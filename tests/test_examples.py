"""The example scripts stay runnable: each prints a sweep and a report command that normzoo accepts as they are."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from normzoo.cli import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", ["santurkar2018.py", "bjorck2018.py"])
@pytest.mark.parametrize("small", [False, True])
def test_example_commands_are_valid_sweeps(script, small, tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--dry-run", "--out", str(tmp_path / "s"),
                             *(["--small"] if small else [])], capture_output=True, text=True, check=True)
    sweep, report = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert sweep[:2] == ["normzoo", "sweep"] and report == ["normzoo", "report", str(tmp_path / "s")]
    checked = CliRunner().invoke(cli, [*sweep[1:], "--dry-run"])  # every spec and value validated, nothing run
    assert checked.exit_code == 0, checked.output
    assert checked.output.count("normzoo run") >= 12
