"""README "Write a plugin", step by step, in a fresh virtual environment: copy the template, install it from its
folder, see it listed, train with its norm and probe, load the checkpoint, uninstall, and the load names the
missing plugin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def uv() -> list[str]:
    if path := shutil.which("uv"):
        return [path]
    if subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True).returncode == 0:
        return [sys.executable, "-m", "uv"]
    pytest.skip("uv is not installed")


@pytest.mark.slow
def test_write_a_plugin_tutorial_in_a_fresh_virtual_environment(tmp_path):
    # As a user's shell would have it; and Python writing bytecode as it imports, as it does by default (a machine
    # with PYTHONDONTWRITEBYTECODE set would compile torch's source again in every step).
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "NORMZOO_LOAD_PLUGINS", "PYTHONDONTWRITEBYTECODE")}
    env["OMP_NUM_THREADS"] = "1"

    def sh(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(a) for a in args], cwd=tmp_path, capture_output=True, text=True, env=env,
                                timeout=600)
        assert not check or result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
        return result

    venv = tmp_path / "venv"
    python, normzoo = venv / "bin" / "python", venv / "bin" / "normzoo"
    sh(*uv(), "venv", "-q", venv, "--python", sys.executable)
    sh(*uv(), "pip", "install", "-q", "--python", python, ROOT)  # normzoo, as a user installs it

    # 1. cp -r the template, 2. install it from its folder
    shutil.copytree(ROOT / "plugins" / "normzoo-example", tmp_path / "normzoo-mynorm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    sh(*uv(), "pip", "install", "-q", "--python", python, "./normzoo-mynorm")
    # 3. normzoo lists it
    norms = {row["name"]: row for row in json.loads(sh(normzoo, "norms", "--json").stdout)}
    assert norms["mean-bn"]["plugin"] == "example"
    plugins = {row["name"]: row for row in json.loads(sh(normzoo, "plugins", "--json").stdout)}
    assert plugins["example"]["version"] == "0.1.0" and plugins["example"]["errors"] == []
    assert "weight-norm" in sh(normzoo, "probes").stdout
    # 4. train with its norm and its probe
    sh(normzoo, "run", "--backbone", "vgg11,width=0.125", "--norm", "mean-bn", "--dataset", "fashion-mnist-mini",
       "--steps", "6", "--batch-size", "32", "--device", "cpu", "--probe", "weight-norm:every=3", "--out", "runs",
       "--run-name", "mine", "--quiet")
    records = [json.loads(line) for line in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("probe") == "weight-norm"] == [0, 3]
    # its probe's report (the plugin's ProbeReport) shows in `normzoo report`
    sh(normzoo, "report", "runs/mine")
    report = (tmp_path / "runs" / "mine" / "report.md").read_text()
    assert "## Weight norms" in report and "](report-figures/weight-norm.png)" in report
    # 5. load its checkpoint
    load = ("import normzoo; model, info = normzoo.load_checkpoint('runs/mine/best.safetensors'); "
            "print(info['norm'], type(model.features[1]).__name__)")
    assert sh(python, "-c", load).stdout.split() == ["mean-bn,eps=1e-05,affine=true,momentum=0.1,sync=false",
                                                      "MeanOnlyBatchNorm"]
    assert "acc" in sh(normzoo, "eval", "runs/mine/best.safetensors", "--json").stdout
    # 6. uninstall: loading names the missing plugin
    sh(*uv(), "pip", "uninstall", "-q", "--python", python, "normzoo-example")
    missing = sh(normzoo, "eval", "runs/mine/best.safetensors", check=False)
    assert missing.returncode == 2
    assert "norm 'mean-bn' comes from plugin 'example' (version 0.1.0), which is not installed; " \
           "pip install normzoo-example" in missing.stderr
