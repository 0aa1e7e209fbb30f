"""Experiment files: `normzoo run --config` and `normzoo sweep FILE`, the command line winning over the file, and
one-line errors naming the key and the file."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from normzoo.cli import cli

TINY = {"backbone": "vgg11,width=0.0625", "dataset": "synthetic,n=32,n_test=16,size=32,channels=3,classes=4",
        "batch_size": 16, "device": "cpu"}


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_run_takes_its_options_from_a_toml_file_and_the_command_line_wins(tmp_path):
    config = write(tmp_path / "run.toml", f"""
        backbone = "{TINY['backbone']}"
        dataset = "{TINY['dataset']}"
        batch-size = 16
        steps = 2
        lr = 0.01
        device = "cpu"
        probe = ["weight-norm:every=1"]
        """)
    result = invoke("run", "--config", config, "--lr", "0.02", "--out", tmp_path, "--run-name", "a", "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["lr"] == 0.02 and saved["steps"] == 2 and saved["probes"] == ["weight-norm:every=1"]


def test_a_run_folders_config_json_runs_again_as_a_config(tmp_path):
    assert invoke("run", "--backbone", TINY["backbone"], "--dataset", TINY["dataset"], "--batch-size", "16",
                  "--steps", "2", "--lr", "0.03", "--device", "cpu", "--out", tmp_path, "--run-name", "first",
                  "--quiet").exit_code == 0
    again = invoke("run", "--config", tmp_path / "first" / "config.json", "--run-name", "second", "--quiet")
    assert again.exit_code == 0, again.output
    first, second = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("first", "second"))
    assert {**first, "run_name": "second"} == second
    reused = invoke("run", "--config", tmp_path / "first" / "config.json", "--quiet")
    assert reused.exit_code == 2 and "already holds a run" in reused.stderr  # its run name is taken


@pytest.mark.parametrize("text, words", [
    ('lrr = 0.1\n', "unknown key 'lrr' in the file (did you mean 'lr'?)"),
    ('lr = "fast"\n', "'lr' in the file must be a number, got " + '"fast"'),
    ('[run]\nsteps = 2.5\n', "'steps' in [run] must be an integer or null"),
    ('[grid]\nlr = [0.1]\n', "has a [grid]: it is an experiment"),
    ('lr = \n', "is not valid TOML"),
])
def test_bad_run_files_are_one_line_naming_the_key_and_the_file(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = invoke("run", "--config", path, "--out", tmp_path / "runs")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(path) in result.stderr and words in result.stderr and result.stderr.count("\n") == 1


EXPERIMENT = f"""
    [grid]
    norm = ["bn", "lp:1,centered=true"]
    lr = [0.01, 0.02]

    [run]
    backbone = "{TINY['backbone']}"
    dataset = "{TINY['dataset']}"
    batch-size = 16
    steps = 2
    device = "cpu"
    probes = ["weight-norm:every=2"]

    [sweep]
    out = "OUT"

    [report]
    title = "From the file"
    target_acc = 0.3
"""


@pytest.mark.slow
def test_a_sweep_runs_from_an_experiment_file_and_reports_with_its_options(tmp_path):
    out = tmp_path / "sweep"
    path = write(tmp_path / "exp.toml", EXPERIMENT.replace("OUT", str(out)))
    dry = invoke("sweep", path, "--dry-run")
    assert dry.exit_code == 0 and dry.output.count("normzoo run") == 4
    assert "--norm lp:1,centered=true" in dry.output and "--probe weight-norm:every=2" in dry.output
    override = invoke("sweep", path, "--lr", "0.05", "--out", tmp_path / "other", "--dry-run")
    assert override.output.count("normzoo run") == 2 and "--lr 0.05" in override.output  # the command line wins
    assert str(tmp_path / "other") in override.output
    ran = invoke("sweep", path, "--norm", "bn", "--quiet")  # two of the file's four runs are enough here
    assert ran.exit_code == 0, ran.output
    assert json.loads((out / "sweep.json").read_text())["report"] == {"title": "From the file", "target_acc": 0.3}
    for source in (path, out):  # the file, or the folder that remembers the file's [report]
        report = invoke("report", source)
        assert report.exit_code == 0, report.output
        assert (out / "report.md").read_text().startswith("# From the file")


@pytest.mark.parametrize("text, words", [
    ("[grids]\nlr = [0.1]\n", "unknown table or key 'grids' (did you mean 'grid'?)"),
    ("[grid]\nlr = 0.1\n", "'lr' in [grid] must be a non-empty list"),
    ('[grid]\nlr = [0.1, "x"]\n', "'lr' in [grid] must be a number"),
    ("[grid]\nlr = [0.1]\n[run]\nlr = 0.2\n", "'lr' is in both [grid] and [run]"),
    ("[run]\nout = 'x'\n", "unknown key 'out' in [run]"),
    ("[sweep]\njobz = 2\n", "unknown key 'jobz' in [sweep] (did you mean 'jobs'?)"),
    ("[report]\ntarget_acc = 'high'\n", "'target_acc' in [report] must be a number"),
    ("[grid]\nnorm = ['gn:0']\n[sweep]\nout = 'x'\n", "'groups' must be ≥ 1"),
    ("[grid]\nlr = [0.1]\n", "give the sweep folder"),
])
def test_bad_experiment_files_are_one_line(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = invoke("sweep", path, "--dry-run")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert words in result.stderr and result.stderr.count("\n") == 1


def test_slurm_settings_come_from_the_sweep_table(tmp_path):
    pytest.importorskip("submitit")
    path = write(tmp_path / "exp.toml", f"""
        [grid]
        lr = [0.01, 0.02]

        [run]
        backbone = "{TINY['backbone']}"
        dataset = "{TINY['dataset']}"

        [sweep]
        out = "{tmp_path / 'out'}"
        executor = "slurm"
        slurm_partition = "gpu"
        time = 90
        cpus_per_run = 4
        slurm_folder = "{tmp_path / 'jobs'}"
    """)
    dry = invoke("sweep", path, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines()[0] == (f"dry run: 2 runs into {tmp_path / 'out'} (SLURM jobs of 4 CPUs, 90 min "
                                          f"each, on partition gpu; job files in {tmp_path / 'jobs'})")
    later = invoke("sweep", path, "--time", "2:00:00", "--dry-run")  # the command line wins
    assert "120 min each" in later.output
