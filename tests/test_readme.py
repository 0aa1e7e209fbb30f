"""The README stays true: CI runs its test command verbatim, and every Python example in it runs as written."""

from __future__ import annotations

import re
import textwrap
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


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", text, flags=re.S)]


def test_every_python_example_in_the_readme_runs_as_written(tmp_path, monkeypatch):
    import torch

    from normzoo.checkpoint import save_checkpoint
    from normzoo.models import build_model

    blocks = python_blocks()
    assert len(blocks) >= 3 and "normzoo.inject(" in blocks[0]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_checkpoint("runs/mine/best.safetensors", build_model("vgg11,width=0.0625", "bn", num_classes=10, in_chans=1),
                    info={"dataset": "fashion-mnist-mini", "classes": [str(i) for i in range(10)],
                          "input_shape": [1, 32, 32]})
    namespaces = []
    for block in blocks:
        namespaces.append({"__name__": "readme_example"})
        exec(compile(block, "README.md", "exec"), namespaces[-1])  # noqa: S102 - the README's own examples
    api = namespaces[0]
    assert api["info"]["backbone"].startswith("vgg11,") and api["layer"].mu == 0.5
    assert "GroupNorm" in repr(api["resnet"].bn1) and "LpNorm" in repr(api["convnext"])
    assert callable(namespaces[-1]["test_mean_bn_keeps_the_norm_contract"])


def test_the_readmes_experiment_file_is_a_valid_sweep(tmp_path):
    from click.testing import CliRunner

    from normzoo.cli import cli

    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                if "[grid]" in b]
    path = tmp_path / "santurkar.toml"
    path.write_text(block)
    result = CliRunner().invoke(cli, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert result.output.count("normzoo run") == 7 * 2 * 3 and "--log tensorboard" in result.output
