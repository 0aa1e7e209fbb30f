"""Runs forked from a process that has imported torch: the same run, log, exit status and lock as a fresh process."""

from __future__ import annotations

import os
import sys
import time

import pytest

from normzoo.forked_run import FORK_ENV, fork_run, runs_fork
from normzoo.rundir import RunDir

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

TINY = ["--backbone", "vgg11,width=0.0625", "--dataset", "synthetic,n=64,n_test=16", "--batch-size", "16",
        "--device", "cpu", "--quiet"]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "normzoo", "run", *TINY, *args]


def wait(process, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        assert time.monotonic() < deadline, "the forked run did not end"
        time.sleep(0.05)
    return process.returncode


def test_a_forked_run_trains_into_its_folder_and_logs_to_its_file(tmp_path):
    log = tmp_path / "run.log"
    log.write_bytes(b"$ the command\n")
    process = fork_run(command("--steps", "2", "--out", str(tmp_path), "--run-name", "forked"), log,
                       {"OMP_NUM_THREADS": "1", "NORMZOO_TEST_MARK": "seen"})
    assert process.pid != os.getpid()
    assert wait(process) == 0, log.read_text()
    assert log.read_text().startswith("$ the command\n")  # appended to, as the sweep's log file is
    summary = RunDir(tmp_path / "forked").read_summary()
    assert summary["status"] == "finished" and summary["step"] == "2"
    assert "NORMZOO_TEST_MARK" not in os.environ  # the child's environment is its own
    assert process.poll() == 0  # polling again keeps the status


def test_a_failing_run_exits_with_its_status_and_its_error_in_the_log(tmp_path):
    log = tmp_path / "run.log"
    process = fork_run(command("--steps", "2", "--batch-size", "100000", "--out", str(tmp_path)), log,
                       {"OMP_NUM_THREADS": "1"})
    assert wait(process) not in (0, None)
    assert "exceeds" in log.read_text()


def test_a_signal_ends_the_child_as_it_would_a_fresh_process(tmp_path):
    log = tmp_path / "run.log"
    process = fork_run(command("--steps", "100000", "--out", str(tmp_path), "--run-name", "long"), log,
                       {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (tmp_path / "long" / "metrics.jsonl").exists():  # training has started: its handler saves and exits
        assert time.monotonic() < deadline and process.poll() is None, log.read_text()
        time.sleep(0.05)
    process.send_signal(15)
    assert wait(process) == 130, log.read_text()
    assert RunDir(tmp_path / "long").has_checkpoint()


def test_the_run_folders_lock_is_handed_to_the_child(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    lock = RunDir(folder).claim()
    handed = lock.hand_over()
    process = fork_run(command("--steps", "1", "--out", str(tmp_path), "--run-name", "locked"), tmp_path / "log",
                       {"OMP_NUM_THREADS": "1", **handed})
    lock.detach()
    assert wait(process) == 0, (tmp_path / "log").read_text()
    RunDir(folder).claim().release()  # the child held it through the descriptor it was given, and let it go


def test_only_cpu_runs_fork_and_the_variable_turns_it_off(monkeypatch):
    monkeypatch.delenv(FORK_ENV, raising=False)
    assert runs_fork("cpu") and not runs_fork("cuda") and not runs_fork("cuda:1")
    monkeypatch.setenv(FORK_ENV, "0")
    assert not runs_fork("cpu")
