"""CLI listings, start-up cost, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from normzoo import __version__
from normzoo.cli import cli

from conftest import run_normzoo


@pytest.mark.parametrize("kind", ["norms", "backbones", "datasets", "probes", "plugins"])
def test_listings_json_have_name_plugin_summary(kind):
    result = CliRunner().invoke(cli, [kind, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert isinstance(rows, list)
    for row in rows:
        assert {"name", "plugin", "summary"} <= row.keys()


def test_norms_table_lists_the_zoo_with_parameters():
    result = CliRunner().invoke(cli, ["norms"])
    assert result.exit_code == 0
    for name in ["none", "bn", "noisy-bn", "lp", "gn", "ln", "in", "l1-bn", "topk-bn"]:
        assert f"\n{name} " in result.output
    assert "lp: p=2 (float in 1..8 or inf), centered=false (bool)" in result.output


def test_help_does_not_import_torch():
    code = ("import sys; from normzoo.cli import cli\n"
            "try:\n    cli.main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False False")


def test_version():
    assert CliRunner().invoke(cli, ["--version"]).output.strip() == f"normzoo, version {__version__}"


def test_bad_spec_is_one_line_exit_2_and_debug_shows_traceback():
    result = CliRunner().invoke(cli, ["build", "vgg11", "--norm", "lpp:inf"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and line.startswith("Error: unknown norm 'lpp' (did you mean 'lp'?); valid: bn, gn, in, ")
    assert line.endswith(", noisy-bn, none, timm-evonorm-b0, timm-evonorm-b1, timm-evonorm-b2, timm-evonorm-s0, "
                         "timm-evonorm-s0a, timm-evonorm-s1, timm-evonorm-s1a, timm-evonorm-s2, timm-evonorm-s2a, "
                         "timm-frn, timm-groupnorm1, timm-layernorm2d, timm-rmsnorm2d, timm-simplenorm2d, topk-bn")
    debug = run_normzoo(["--debug", "build", "--norm", "lpp"])  # a real process: the traceback reaches stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_build_reports_the_model():
    result = CliRunner().invoke(cli, ["build", "vgg11,width=0.125", "--norm", "lp:inf", "--in-chans", "1"])
    assert result.exit_code == 0, result.output
    assert "lp:inf" in result.output and "8 layers: LpNorm" in result.output
