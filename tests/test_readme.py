"""The README's two commands stay true: CI runs the README's test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"<!-- command -->\n```(?:bash|sh)?\n(.+?)\n```", text)


def test_readme_states_exactly_two_commands():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert "normzoo run" in commands[0] and "fashion-mnist-mini" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
