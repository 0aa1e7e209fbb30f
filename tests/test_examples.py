"""The example experiment files stay valid: each is a sweep normzoo accepts as it is (every spec and value checked,
nothing run), and each says in its header how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from normzoo.cli import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = sorted(p.name for p in EXAMPLES.glob("*.toml"))


def test_the_paper_experiments_and_their_small_variants_are_there():
    assert {"santurkar2018.toml", "santurkar2018-small.toml", "bjorck2018.toml", "bjorck2018-small.toml"} <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_every_example_experiment_file_is_a_valid_sweep(name, tmp_path):
    path = EXAMPLES / name
    checked = CliRunner().invoke(cli, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "s")])
    assert checked.exit_code == 0, checked.output
    assert checked.output.count("normzoo run") >= 12
    assert f"normzoo sweep examples/{name}" in path.read_text()  # the header says how to run it
