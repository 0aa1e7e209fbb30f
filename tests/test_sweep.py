"""``normzoo sweep``: the grid, the run folders, resume/skip/retry semantics, isolation of failures, --jobs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from normzoo.cli import cli
from normzoo.errors import NormzooError
from normzoo.lock import RunLock
from normzoo.report import write_report
from normzoo.sweep import plan, run_name, run_state, slot_environments, split_specs

from conftest import run_normzoo, start_normzoo

BASE = ["--backbone", "vgg11,width=0.0625", "--dataset", "fashion-mnist-mini", "--device", "cpu", "--log-every", "2"]
TINY = [*BASE, "--eval-every", "4"]


def sweep(*args: str, timeout: float = 240, fresh: bool = False) -> subprocess.CompletedProcess[str]:
    """The sweep forked from this process, or with ``fresh`` a new ``python -m normzoo`` (for a test process that
    is connected to Ray, which must not be forked)."""
    return run_normzoo(["sweep", *TINY, *args], timeout=timeout, fresh=fresh)


def read_csv(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "sweep.csv").open(newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("text, items", [
    ("bn,lp:inf,gn:32", ["bn", "lp:inf", "gn:32"]),
    ("bn,lp:1,centered=true,gn:8", ["bn", "lp:1,centered=true", "gn:8"]),
    ("noisy-bn:mu=0.5,sigma=1.25", ["noisy-bn:mu=0.5,sigma=1.25"]),
    ("vgg11,width=0.5,glorot=true;timm:resnet18", ["vgg11,width=0.5,glorot=true", "timm:resnet18"]),
    (" bn , none ,", ["bn", "none"]),
])
def test_split_specs_keeps_spec_parameters_with_their_spec(text, items):
    assert split_specs(text) == items


def test_plan_is_the_cartesian_product_named_by_what_varies():
    runs = plan({"norm": ["bn", "lp:inf"], "lr": [0.1, 0.5], "seed": [0, 1, 2], "steps": [100]}, {"probes": ["ics"]})
    assert len(runs) == 12
    assert runs[0].name == "norm-bn__lr-0.1__seed-0" and runs[-1].name == "norm-lp_inf__lr-0.5__seed-2"
    assert runs[0].swept == {"norm": "bn", "lr": 0.1, "seed": 0}  # steps is fixed: not in the name
    assert runs[0].options == {"norm": "bn", "lr": 0.1, "seed": 0, "steps": 100, "probes": ["ics"]}
    assert len({r.name for r in runs}) == 12
    assert plan({"norm": ["bn"]}, {})[0].name == "run"
    assert run_name({"augment": True}) == "augment-true"


def test_plan_rejects_repeated_values_and_colliding_names():
    with pytest.raises(NormzooError, match="twice"):
        plan({"lr": [0.1, 0.1]}, {})
    with pytest.raises(NormzooError, match="share the folder"):
        plan({"norm": ["lp:1", "lp_1"]}, {})


def test_jobs_split_cpu_threads_or_take_one_gpu_each(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert [e["OMP_NUM_THREADS"] for e in slot_environments(4, 0, "cpu")] == ["2"] * 4
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in slot_environments(2, 0, "auto"))
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_environments(3, 2, "auto")] == ["0", "1", "0"]
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in slot_environments(2, 2, "cpu"))


@pytest.mark.slow
def test_sweep_isolates_failures_and_divergence_then_skips_and_retries(tmp_path):
    out = tmp_path / "sweep"
    grid = ["--norm", "none", "--steps", "6", "--lr", "0.05,1e4", "--batch-size", "16,20000", "--jobs", "2",
            "--probe", "landscape:every=3,steps=3", "--out", str(out)]
    first = sweep(*grid)
    assert first.returncode == 1, first.stderr  # some runs failed, the others ran
    rows = read_csv(out)
    assert set(rows) == {f"lr-{lr}__batch-size-{b}" for lr in ("0.05", "10000.0") for b in (16, 20000)}
    assert rows["lr-0.05__batch-size-16"]["state"] == "finished"
    assert rows["lr-0.05__batch-size-16"]["step"] == "6"
    assert float(rows["lr-0.05__batch-size-16"]["landscape_beta_median"]) > 0  # probe summaries in the csv
    assert rows["lr-10000.0__batch-size-16"]["state"] == "diverged"
    for name in ("lr-0.05__batch-size-20000", "lr-10000.0__batch-size-20000"):
        assert rows[name]["state"] == "failed"
        assert "exceeds the 10000 training examples" in rows[name]["error"]
        assert "exceeds" in (out / name / "run.log").read_text()
    record = json.loads((out / "lr-0.05__batch-size-16" / "sweep-run.json").read_text())
    assert record["command"].startswith("normzoo run --backbone") and "--norm none" in record["command"]
    assert record["failed"] is None

    report = write_report(out).markdown.read_text()  # a diverged run and two failed ones do not stop it
    assert "failed before training started" in report and "`lr-0.05__batch-size-20000`" in report
    assert "2 runs (1 diverged, 1 finished)" in report and "diverged in 1 of 1 runs" in report

    finished_log = (out / "lr-0.05__batch-size-16" / "metrics.jsonl").read_text()
    again = sweep(*grid)
    assert again.returncode == 1
    assert "skip   lr=0.05 batch_size=16: finished" in again.stdout
    assert "skip   lr=10000.0 batch_size=16: diverged" in again.stdout
    assert "--retry-failed" in again.stdout and "start" not in again.stdout
    assert (out / "lr-0.05__batch-size-16" / "metrics.jsonl").read_text() == finished_log

    retried = sweep(*grid, "--retry-failed")
    assert retried.stdout.count("retry  ") == 2 and "exceeds" in retried.stdout
    assert (out / "lr-0.05__batch-size-16" / "metrics.jsonl").read_text() == finished_log


def test_rerun_with_other_fixed_options_is_refused(tmp_path):
    out = tmp_path / "sweep"
    assert sweep("--norm", "bn", "--steps", "2", "--out", str(out)).returncode == 0
    changed = sweep("--norm", "bn", "--steps", "3", "--out", str(out))
    assert changed.returncode == 2
    assert "started with other options (--steps 2 -> 3)" in changed.stderr


def test_bad_values_fail_before_any_run(tmp_path):
    result = CliRunner().invoke(cli, ["sweep", *TINY, "--norm", "bn,lp:fast", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "lp" in result.output and not (tmp_path / "s").exists()
    result = CliRunner().invoke(cli, ["sweep", "--lr", "0.1,abc", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "--lr" in result.output
    result = CliRunner().invoke(cli, ["sweep", "--augment", "maybe", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "true or false" in result.output


def test_dry_run_prints_each_runs_command(tmp_path):
    result = CliRunner().invoke(cli, ["sweep", *TINY, "--norm", "bn,lp:1,centered=true", "--augment", "true,false",
                                      "--out", str(tmp_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--norm lp:1,centered=true" in result.output and "--no-augment" in result.output
    assert result.output.count("normzoo run") == 4 and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_ctrl_c_checkpoints_running_runs_and_the_same_command_resumes_them(tmp_path):
    interrupt_then_resume(tmp_path / "sweep", ["--steps", "200", "--batch-size", "32"])


def interrupt_then_resume(out: Path, options: list[str], *, fresh: bool = False,
                          resume_here: bool = False) -> None:
    """Ctrl-C a one-run sweep once it has trained a little: the run saves a checkpoint; the same command then
    finishes it with no training record lost or repeated (also used by the Ray and SLURM executors' tests).

    ``fresh``: the sweep is a new ``python -m normzoo`` process, else a fork of this one (see ``start_normzoo``);
    ``resume_here``: the second sweep runs in this process (it needs no signal).
    """
    steps = int(options[options.index("--steps") + 1])
    args = ["sweep", *BASE, "--norm", "bn", "--eval-every", "1000", *options, "--out", str(out), "--quiet"]
    process = start_normzoo(args, fresh=fresh)
    wait_for_training(out / "run")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert "stopping" in stdout and "run the same command again" in stderr
    assert run_state(out / "run") == "interrupted"
    assert 0 < int(read_csv(out)["run"]["step"]) < steps

    if resume_here:
        resumed = CliRunner().invoke(cli, args)
        assert resumed.exit_code == 0, resumed.output
    else:
        resumed = run_normzoo(args, timeout=240, fresh=fresh)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resume" in resumed.stdout
    assert_finished_with_every_record_once(out, steps)


def isolate_skip_retry(run_sweep: Callable[..., Result], grid: list[str], out: Path, too_large: int,
                       examples: int, check_first: Callable[[Result], None]) -> None:
    """A sweep of two runs through an executor (``grid`` sets ``--batch-size 16,TOO_LARGE``), three times: the run
    whose batch exceeds the ``examples`` training examples fails alone (``check_first`` then looks at what the
    executor left), the same command skips both, and ``--retry-failed`` retries only the failed one."""
    ok, failed = "batch-size-16", f"batch-size-{too_large}"
    first = run_sweep(*grid)
    assert first.exit_code == 1, first.output  # one run failed, the other ran
    rows = read_csv(out)
    assert rows[ok]["state"] == "finished" and rows[ok]["step"] == "6" and float(rows[ok]["wall_s"]) > 0
    assert rows[failed]["state"] == "failed"
    assert f"exceeds the {examples} training examples" in rows[failed]["error"]
    log = (out / failed / "run.log").read_text()
    assert log.startswith("$ normzoo run --backbone") and "exceeds" in log  # the run, wherever it ran, logged here
    check_first(first)

    finished_log = (out / ok / "metrics.jsonl").read_text()
    again = run_sweep(*grid)
    assert again.exit_code == 1
    assert "skip   batch_size=16: finished" in again.output
    assert f"skip   batch_size={too_large}: failed" in again.output
    assert "--retry-failed" in again.output and "start" not in again.output

    retried = run_sweep(*grid, "--retry-failed")
    assert retried.exit_code == 1
    assert retried.output.count("retry  ") == 1 and "exceeds" in retried.output
    assert (out / ok / "metrics.jsonl").read_text() == finished_log


def train_steps(run: Path) -> list[int]:
    """The steps of a run's training records, in the order metrics.jsonl holds them."""
    metrics = run / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    return [json.loads(line)["step"] for line in text.splitlines() if '"train"' in line]


def wait_for_training(run: Path, past: int = 0, timeout: float = 120) -> list[int]:
    """Wait until the run has a training record past step ``past``; returns the steps recorded by then."""
    deadline = time.time() + timeout
    while time.time() < deadline and not any(step > past for step in train_steps(run)):
        time.sleep(0.2)
    return train_steps(run)


def assert_finished_with_every_record_once(out: Path, steps: int) -> None:
    """The sweep's one run finished all its steps, and its interruptions lost or repeated no training record."""
    row = read_csv(out)["run"]
    assert row["state"] == "finished" and row["step"] == str(steps)
    records = train_steps(out / "run")
    assert records == sorted(set(records)) and records[-1] == steps


def test_run_state_reads_the_run_folder(tmp_path):
    path = tmp_path / "run"
    assert run_state(path) == "pending"
    path.mkdir()
    (path / "config.json").write_text("{}")
    assert run_state(path) == "started"  # killed before its first checkpoint: it starts over
    (path / "last.safetensors").write_bytes(b"")
    assert run_state(path) == "interrupted"
    with RunLock(path):
        assert run_state(path) == "locked" and run_state(path, holding=True) == "interrupted"
    (path / "sweep-run.json").write_text(json.dumps({"failed": {"returncode": 1, "error": "boom"}}))
    assert run_state(path) == "failed"
    (path / "summary.csv").write_text("run,status\nrun,diverged\n")
    assert run_state(path) == "diverged"


def test_a_runs_end_is_recorded_under_its_folders_lock(tmp_path, monkeypatch):
    """Another sweep claiming the folder removes the temporary files it finds: the record is written holding the
    lock, and not at all while someone else holds it."""
    from normzoo import sweep as sweep_module
    from normzoo.lock import holder_of
    from normzoo.sweep import Ended, Sweep, read_record

    run = plan({"norm": ["bn"]}, {})[0]
    lines: list[str] = []
    sweeper = Sweep([run], tmp_path, echo=lines.append)
    run.path.mkdir(parents=True)
    holders = []
    write = sweep_module.atomic_write_json

    def watched(path, obj, **kwargs):
        holders.append(holder_of(path.parent))
        return write(path, obj, **kwargs)

    monkeypatch.setattr(sweep_module, "atomic_write_json", watched)
    assert sweeper.reap(Ended(run, 1, 2.0, "boom")) == "failed"
    assert holders[0]["pid"] == os.getpid() and holder_of(run.path) is None
    assert read_record(run.path)["failed"]["error"] == "boom"
    with RunLock(run.path):  # another sweep's claim, from this process's point of view
        assert sweeper.reap(Ended(run, 0, 1.0)) == "locked"
    assert len(holders) == 1 and read_record(run.path)["wall_s"] == 2.0
    assert lines[-1].startswith(f"skip   {run.label()}: being written by pid {os.getpid()}")
