"""What a run folder promises, each promise a test (the README's "Guarantees" section names them).

Crashes are real: a forked child process trains and dies with ``os._exit`` (no handler, no cleanup) at a chosen
point of the save sequence; then the run is resumed and must end bit-identical to a run that was never
interrupted, or be refused in one line. Disks are real too where the machine allows it: a tmpfs mounted
read-only, or filled up in the middle of a run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from normzoo import hookimpl
from normzoo.cli import cli
from normzoo.config import RunConfig
from normzoo.errors import NormzooError
from normzoo.lock import LOCK_FILE, RunLock
from normzoo.probe import Probe
from normzoo.rundir import RunDir, claim_new_run
from normzoo.runner import resume, train

from conftest import NormzooProcess, run_normzoo

TINY = dict(backbone="vgg11,width=0.0625", dataset="synthetic,n=96,n_test=32,size=32,channels=3,classes=4",
            batch_size=16, lr=0.05, log_every=2, device="cpu", schedule="constant")
# noisy-bn, augmentation and momentum: a resume must restore the RNG streams and the optimizer, not only weights.
CONFIG = dict(TINY, norm="noisy-bn", steps=8, eval_every=3, augment=True, momentum=0.9)
CRASHED = 86  # the exit code of a child that was made to crash


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here on one thread: a forked child must compute bit for bit what this process computes (a
    different thread count changes the summation order of reductions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def train_records(run: Path) -> list[int]:
    return [r["step"] for r in RunDir(run).read_log() if r["type"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights and optimizer state after CONFIG's 8 steps, trained without interruption."""
    out = tmp_path_factory.mktemp("reference")
    assert train(RunConfig(**CONFIG, out=str(out), run_name="straight"), quiet=True).status == "finished"
    return load_file(out / "straight" / "last.safetensors")


def same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Weights, buffers and optimizer state equal bit for bit (the loop's JSON counters hold wall times)."""
    keys = {k for k in a if not k.startswith("training_state.extra.")}
    return keys == {k for k in b if not k.startswith("training_state.extra.")} and \
        all(torch.equal(a[k], b[k]) for k in keys)


# -- a crash at every point of the save sequence ---------------------------------------------------------------
def install_crash(point: str, n: int) -> None:
    """Make this process die at the n-th ``point``: before or after an atomic rename, or halfway through writing
    a safetensors file (the bytes so far on disk, as a SIGKILL mid-write leaves them)."""
    import safetensors.torch

    calls = {"count": 0}

    def due() -> bool:
        calls["count"] += 1
        return calls["count"] == n

    if point in ("before-rename", "after-rename"):
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            crash = due()
            if crash and point == "before-rename":
                os._exit(CRASHED)
            real_replace(src, dst, *args, **kwargs)
            if crash:
                os._exit(CRASHED)

        os.replace = replace
    else:
        real_save = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            if due():
                size = os.path.getsize(filename)
                os.truncate(filename, size // 2)
                os._exit(CRASHED)

        safetensors.torch.save_file = save_file


def crash_during_training(out: Path, point: str, n: int) -> int:
    """Train CONFIG into ``out/cut`` in a forked child that crashes at the n-th ``point``; its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)  # the parent's OpenMP threads do not exist in a forked child
            install_crash(point, n)
            train(RunConfig(**CONFIG, out=str(out), run_name="cut"), quiet=True)
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.slow
@pytest.mark.parametrize("point, at_least", [("before-rename", 6), ("after-rename", 6), ("mid-write", 3)])
def test_a_crash_at_any_point_of_saving_resumes_exactly_or_is_refused(tmp_path, reference, point, at_least):
    crashes = 0
    for n in range(1, 40):
        out = tmp_path / f"{point}-{n}"
        code = crash_during_training(out, point, n)
        if code == 0:  # fewer than n such points in a whole run: every one has been tried
            break
        assert code == CRASHED
        crashes += 1
        run = out / "cut"
        try:
            result = resume(run, quiet=True)
        except NormzooError as exc:  # crashed before anything could be resumed: said in one line
            assert not (run / "last.safetensors").exists(), f"{point} {n}: refused although a checkpoint exists"
            assert "no checkpoint" in str(exc) or "not a run folder" in str(exc), str(exc)
            result = train(RunConfig(**CONFIG, out=str(out), run_name="cut"), quiet=True, overwrite=True)
        assert result.status == "finished" and result.summary["step"] == 8
        assert same_training(load_file(run / "last.safetensors"), reference), f"{point} at occurrence {n}"
        assert train_records(run) == [2, 4, 6, 8], f"{point} at occurrence {n}: records lost or repeated"
        assert not list(run.glob(".*.tmp")) and not (run / LOCK_FILE).exists()
        summary = RunDir(run).read_summary()
        assert summary["test_acc"] and summary["best_step"] in ("3", "6", "8")
    assert crashes >= at_least  # config, checkpoints, best checkpoints (and the summary) were all hit


def test_a_crash_between_an_older_normzoos_two_checkpoint_files_is_refused(tmp_path):
    # Runs written before checkpoints became one file had the training state apart: if the two disagree, the
    # resume says so instead of continuing from a mix (today's main continued, with every tensor wrong).
    from normzoo.models import build_model
    from normzoo.runner import make_optimizer
    from normzoo.state import save_training_state

    run = tmp_path / "old"
    config = RunConfig(**{**CONFIG, "steps": 6}, out=str(tmp_path), run_name="old")
    train(config, quiet=True)
    optimizer = make_optimizer(config, build_model(config.backbone, config.norm, num_classes=4, in_chans=3))
    save_training_state(run / "last.state.safetensors", optimizer, extra={"step": 3})
    with pytest.raises(NormzooError, match="disagree.*step 6.*step 3"):
        resume(run, quiet=True, steps=8)


# -- a run name is never reused silently ---------------------------------------------------------------------------
def cli_run(*args: str) -> object:
    options = ["--backbone", TINY["backbone"], "--dataset", TINY["dataset"], "--batch-size", "16", "--steps", "4",
               "--device", "cpu", "--quiet"]
    return CliRunner().invoke(cli, ["run", *options, *args])


def test_an_existing_run_folder_is_refused_and_overwrite_replaces_it(tmp_path):
    first = cli_run("--norm", "bn", "--out", str(tmp_path), "--run-name", "base")
    assert first.exit_code == 0, first.output
    before = run_files(tmp_path / "base")
    again = cli_run("--norm", "gn:2", "--out", str(tmp_path), "--run-name", "base")
    assert again.exit_code == 2 and "Traceback" not in again.output
    message = again.stderr.strip()
    assert "\n" not in message and "already holds a run (finished)" in message
    assert "--resume" in message and "--overwrite" in message and str(tmp_path / "base") in message
    assert run_files(tmp_path / "base") == before  # nothing touched
    replaced = cli_run("--norm", "gn:2", "--out", str(tmp_path), "--run-name", "base", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((tmp_path / "base" / "config.json").read_text())["norm"].startswith("gn:2")
    assert len([r for r in RunDir(tmp_path / "base").read_log() if r["type"] == "status"]) == 1


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda *args: "20261201-120000")
    first = claim_new_run(tmp_path, RunDir.new_name("vgg11", "bn", 0), unique=True)
    second = claim_new_run(tmp_path, RunDir.new_name("vgg11", "bn", 0), unique=True)
    assert first[0].path.name == "20261201-120000-vgg11-bn-s0"
    assert second[0].path.name == "20261201-120000-vgg11-bn-s0-2"
    for run, lock, _ in (first, second):
        lock.release()
    a = train(RunConfig(**TINY, norm="bn", steps=2, out=str(tmp_path / "same")), quiet=True)
    b = train(RunConfig(**TINY, norm="bn", steps=2, out=str(tmp_path / "same")), quiet=True)
    assert a.run_dir != b.run_dir and len(train_records(a.run_dir)) == len(train_records(b.run_dir)) == 1


# -- resuming a finished run -----------------------------------------------------------------------------------------
def test_resuming_a_finished_run_changes_nothing_and_a_larger_steps_continues_it_exactly(tmp_path, reference):
    run = tmp_path / "done"
    train(RunConfig(**{**CONFIG, "steps": 6}, out=str(tmp_path), run_name="done"), quiet=True)
    before = run_files(run)
    again = CliRunner().invoke(cli, ["run", "--resume", str(run), "--quiet"])
    assert again.exit_code == 0, again.output
    assert "already finished at step 6; nothing to do" in again.stderr
    assert run_files(run) == before  # not a byte changed: summary, metrics and checkpoints as they were

    longer = resume(run, quiet=True, steps=8)
    assert longer.status == "finished"
    assert same_training(load_file(run / "last.safetensors"), reference)
    summary = RunDir(run).read_summary()
    assert summary["step"] == "8" and summary["total_steps"] == "8" and summary["test_acc"] != ""
    evals = [r for r in RunDir(run).read_log() if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6, 8]
    best = max(evals, key=lambda r: r["acc"])
    assert int(summary["best_step"]) == best["step"] and float(summary["best_test_acc"]) == pytest.approx(best["acc"])
    assert train_records(run) == [2, 4, 6, 8]


# -- one writer per run folder ---------------------------------------------------------------------------------------
def test_resume_of_a_run_another_process_holds_is_refused_naming_it(tmp_path):
    train(RunConfig(**TINY, norm="bn", steps=2, out=str(tmp_path), run_name="busy"), quiet=True)
    before = run_files(tmp_path / "busy")
    with RunLock(tmp_path / "busy"):
        result = CliRunner().invoke(cli, ["run", "--resume", str(tmp_path / "busy"), "--steps", "4"])
    assert result.exit_code == 75 and "Traceback" not in result.output
    assert f"pid {os.getpid()} on host" in result.stderr and "one writer at a time" in result.stderr
    after = run_files(tmp_path / "busy")
    after.pop(LOCK_FILE, None)
    assert after == before


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    train(RunConfig(**TINY, norm="bn", steps=2, out=str(tmp_path), run_name="stale"), quiet=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "stale" / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": "gone", "started": 0}))
    result = resume(tmp_path / "stale", quiet=True, steps=4)
    assert result.status == "finished" and result.summary["step"] == 4
    assert not (tmp_path / "stale" / LOCK_FILE).exists()


@pytest.mark.slow
def test_two_sweeps_on_one_folder_train_every_run_once(tmp_path):
    out = tmp_path / "sweep"
    command = ["sweep", "--backbone", TINY["backbone"], "--dataset", TINY["dataset"], "--norm", "none,bn,gn:2",
               "--steps", "4", "--batch-size", "16", "--log-every", "2", "--device", "cpu", "--out", str(out),
               "--quiet"]
    first, second = NormzooProcess(command), NormzooProcess(command)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    started = [line.split()[1] for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("start")]
    assert sorted(started) == ["norm=bn", "norm=gn:2", "norm=none"], outputs  # each run started by one sweep
    for run in ("norm-none", "norm-bn", "norm-gn_2"):
        assert train_records(out / run) == [2, 4], run
        assert RunDir(out / run).read_summary()["status"] == "finished"
    third = run_normzoo(command)
    assert third.returncode == 0 and third.stdout.count("skip") == 4  # 3 runs and the tally line


# -- disks that refuse writes ----------------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """Mount a real tmpfs (root only; skipped elsewhere): ``tmpfs(options)`` returns its folder."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_read_only_out_is_one_line(tmpfs):
    folder = tmpfs("ro,size=1m")
    result = cli_run("--norm", "bn", "--out", str(folder / "runs"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0 and "Read-only file system" in result.stderr


class FillDisk(Probe):
    """Fills the disk holding the run folder at step ``at`` (what another job writing a big file does)."""

    name = "fill-disk"

    def measure(self, ctx):
        if "NZ_TEST_FILL" not in os.environ:
            return {}
        with open(Path(os.environ["NZ_TEST_FILL"]) / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        return {}


class FillDiskPlugin:
    @hookimpl
    def register_probes(self, register):
        register("fill-disk", FillDisk, summary="fills the disk (tests)")


def test_a_disk_that_fills_up_keeps_the_last_checkpoint_and_the_run_resumes(tmpfs, fresh_plugins, monkeypatch,
                                                                            reference):
    fresh_plugins.register(FillDiskPlugin(), name="nz-fill")
    folder = tmpfs("size=8m")
    monkeypatch.setenv("NZ_TEST_FILL", str(folder))
    config = RunConfig(**CONFIG, out=str(folder), run_name="full", probes=["fill-disk:init=false,at=4"])
    with pytest.raises(NormzooError, match="No space left on device") as info:
        train(config, quiet=True)
    assert info.value.__cause__.errno == 28 and info.value.exit_code == 1  # ENOSPC, from the filesystem
    run = folder / "full"
    assert load_file(run / "last.safetensors")  # the step-3 checkpoint is whole (its checksum is checked below)
    assert not list(run.glob(".*.tmp")) and not (run / LOCK_FILE).exists()
    (folder / "filler").unlink()
    monkeypatch.delenv("NZ_TEST_FILL")  # the probe is in the run's config: this time it fills nothing
    result = resume(run, quiet=True)
    assert result.status == "finished" and same_training(load_file(run / "last.safetensors"), reference)


def test_the_cli_reports_a_full_disk_in_one_line(tmpfs, fresh_plugins, monkeypatch):
    fresh_plugins.register(FillDiskPlugin(), name="nz-fill")
    folder = tmpfs("size=8m")
    monkeypatch.setenv("NZ_TEST_FILL", str(folder))
    result = cli_run("--norm", "bn", "--out", str(folder), "--run-name", "full", "--probe",
                     "fill-disk:init=false,at=1", "--eval-every", "2", "--log-every", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0 and "No space left on device" in result.stderr
    assert "the disk is full" in result.stderr


def test_checkpoints_get_the_permissions_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        train(RunConfig(**TINY, norm="bn", steps=2, out=str(tmp_path), run_name="m"), quiet=True)
    finally:
        os.umask(old)
    for name in ("last.safetensors", "best.safetensors", "config.json", "summary.csv"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o644, name


def test_sigterm_finishes_the_step_saves_and_exits_130(tmp_path):
    # Ctrl-C (SIGINT) is tested in test_runner.py; a scheduler's SIGTERM must do the same for a real process.
    command = ["run", "--backbone", TINY["backbone"], "--dataset", TINY["dataset"], "--norm", "bn", "--steps",
               "100000", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path), "--run-name", "sig",
               "--quiet", "--eval-every", "50"]
    process = NormzooProcess(command)
    deadline = time.time() + 120
    while not (tmp_path / "sig" / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume" in err and RunDir(tmp_path / "sig").read_summary()["status"] == "interrupted"
    assert (tmp_path / "sig" / "last.safetensors").exists() and not (tmp_path / "sig" / LOCK_FILE).exists()


def test_a_stop_signal_ignored_at_start_stays_ignored():
    # How a SLURM job starts its run: SLURM's SIGTERM to every process is ignored, the job's SIGINT stops the run.
    from normzoo.runner import StopRequest

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum is None
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
