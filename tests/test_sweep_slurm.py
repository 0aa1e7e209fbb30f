"""``normzoo sweep --executor slurm``, run with submitit's local executor (the hidden ``--slurm-cluster local``: each
job a local process, requeues included): the same folders, skip/resume/retry and Ctrl-C semantics as the other
executors, and the time-limit and pre-emption signals that checkpoint a run and requeue its job. What only a real
cluster does (sbatch, array jobs, scancel) is checked against stand-in commands that record what they were asked.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

submitit = pytest.importorskip("submitit")

from normzoo import sweep_slurm  # noqa: E402
from normzoo.cli import cli  # noqa: E402
from normzoo.errors import NormzooError  # noqa: E402
from normzoo.lock import holder_of  # noqa: E402
from normzoo.sweep import plan  # noqa: E402
from test_sweep import (  # noqa: E402
    assert_finished_with_every_record_once, interrupt_then_resume, isolate_skip_retry, train_steps)

DATA = ["--backbone", "vgg11,width=0.0625", "--dataset", "synthetic,n=96,n_test=32,size=32,channels=3,classes=4",
        "--device", "cpu", "--log-every", "2"]
LOCAL = ["--executor", "slurm", "--slurm-cluster", "local"]


def sweep(*args: str) -> Result:
    """The sweep in this process (its runs are the jobs' processes): no second torch import to wait for."""
    return CliRunner().invoke(cli, ["sweep", *DATA, *args, "--quiet"])


@pytest.mark.slow
def test_slurm_sweep_isolates_failures_then_skips_and_retries(tmp_path):
    # A diverged run is the run's own verdict, read from its folder whatever the executor (tests/test_sweep.py).
    out = tmp_path / "sweep"
    grid = ["--norm", "none", "--steps", "6", "--batch-size", "16,1000", *LOCAL, "--out", str(out)]

    def check_first(first: Result) -> None:
        assert "(SLURM jobs of 1 CPU, 60 min each, on submitit's local executor" in first.output
        assert len(list((out / "slurm").glob("*_result.pkl"))) == 2  # each run was a submitit job
        assert not list((out / "slurm").glob("stop-*"))

    isolate_skip_retry(sweep, grid, out, 1000, 96, check_first)


@pytest.mark.slow
def test_ctrl_c_checkpoints_slurm_jobs_and_the_same_command_resumes_them(tmp_path):
    # the sweep writes its stop file and signals each job, which passes the stop on to its run: no requeue
    interrupt_then_resume(tmp_path / "sweep", ["--steps", "200", "--batch-size", "32", *LOCAL])


def until(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError("waited two minutes for the run")
        time.sleep(0.1)


def job_and_run(run: Path) -> tuple[int, int]:
    """The pids of a run's job (the submitit process) and of the run (its child, which holds the folder's lock)."""
    child = holder_of(run)["pid"]
    stat = Path(f"/proc/{child}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1]), child


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job's pid in /proc")
def test_time_limit_and_preemption_checkpoint_the_run_and_the_requeued_job_resumes_it(tmp_path):
    out, steps = tmp_path / "sweep", 300
    run, errors = out / "run", []

    def preempt() -> None:
        try:
            seen, last = 0, None
            # the time-limit signal, then a pre-emption of the requeued job; SLURM signals every process of the
            # job, so the run gets the signal too (it ignores both, and stops for the job's SIGINT)
            for signum in (signal.SIGUSR2, signal.SIGTERM):
                until(lambda: (holder_of(run) or {}).get("pid") not in (None, last) and train_steps(run)
                      and train_steps(run)[-1] > seen)  # a new incarnation of the run, training
                job, child = job_and_run(run)
                os.kill(child, signum)
                os.kill(job, signum)
                until(lambda: (holder_of(run) or {}).get("pid") != child)  # it saved its checkpoint and exited
                seen, last = train_steps(run)[-1], child
        except Exception as exc:  # reported by the test, not lost in this thread
            errors.append(exc)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    result = sweep("--norm", "bn", "--batch-size", "16", "--eval-every", "1000", "--steps", str(steps), *LOCAL,
                   "--out", str(out))
    thread.join(timeout=10)
    assert not errors, errors
    assert result.exit_code == 0, result.output
    assert result.output.count("start  run") == 1 and "resume" not in result.output  # the job resumed the run
    log = (run / "run.log").read_text()
    assert log.count("Interrupted at step") == 2 and log.count("--quiet  # requeued") == 2
    assert all(line.startswith("$ normzoo run --resume") for line in log.splitlines() if line.endswith("# requeued"))
    assert_finished_with_every_record_once(out, steps)
    job_log = "".join(p.read_text() for p in (out / "slurm").glob("*_log.out"))
    assert job_log.count("Requeued job") == 2 and "this job is preempted" in job_log


def test_a_requeued_job_resumes_or_starts_over_as_the_sweep_would(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    job = sweep_slurm.SlurmRun(["normzoo", "run", "--run-name", "run"], ["normzoo", "run", "--resume", str(run)],
                               str(run), str(tmp_path), {}, str(tmp_path / "stop"))
    assert job.command_now() == job.command  # as the sweep prepared it
    (run / "config.json").write_text("{}")
    assert job.command_now() == [*job.command, "--overwrite"]  # killed before its first checkpoint: start over
    (run / "last.safetensors").write_bytes(b"")
    assert job.command_now() == job.resume

    requeued = job.checkpoint()  # what submitit's handler dumps for the requeued job
    assert requeued.function.requeued == 1 and requeued.function.command == job.command and not requeued.args
    job.process, job.signals = object(), [signal.SIGTERM]  # a live job's process and signals stay behind
    assert pickle.loads(pickle.dumps(job)) == job and not hasattr(pickle.loads(pickle.dumps(job)), "process")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, scancel and srun stand-ins on PATH: sbatch numbers the jobs and keeps each script."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
n=$(ls {calls} | grep -c sbatch)
cp "$1" {calls}/sbatch-$n.sh
echo "Submitted batch job $((100 + n))"
""")
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {calls}/scancel\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_runs_go_as_one_array_job_per_request_and_a_stop_signals_or_cancels_them(tmp_path, fake_slurm):
    runs = plan({"device": ["cuda", "cpu"], "seed": [0, 1, 2]}, {})
    executor = sweep_slurm.SlurmExecutor(tmp_path / "jobs", partition="gpu", cpus_per_run=2, time_min=90)
    executor.__enter__()
    for run in runs:
        run.path = tmp_path / "sweep" / run.name
        executor.start(run, run.command(tmp_path / "sweep"), run.path / "run.log")
    assert executor.running() == 6 and not list(fake_slurm.glob("sbatch-*"))  # kept back until flush
    executor.flush()
    scripts = sorted(fake_slurm.glob("sbatch-*.sh"))
    assert len(scripts) == 2  # the runs on CUDA request a GPU each, the others none
    gpu, cpu = (script.read_text() for script in scripts)
    for script in (gpu, cpu):
        assert "#SBATCH --array=0-2%3" in script and "#SBATCH --partition=gpu" in script
        assert "#SBATCH --time=90" in script and "#SBATCH --cpus-per-task=2" in script
        assert "#SBATCH --signal=USR2@90" in script and "#SBATCH --job-name=normzoo:sweep" in script
    assert "#SBATCH --gpus-per-node=1" in gpu and "gpus-per-node" not in cpu
    assert sorted(job.job_id for job in executor.jobs) == ["100_0", "100_1", "100_2", "101_0", "101_1", "101_2"]

    executor.stop()
    ids = " ".join(str(job.job_id) for job in executor.jobs)
    assert (fake_slurm / "scancel").read_text().splitlines() == [f"--state=PENDING {ids}",
                                                                 f"--signal=TERM --state=RUNNING {ids}"]
    assert executor.stop_file.exists()  # written first: the jobs take the SIGTERM for the sweep's stop


def test_sbatch_refusing_the_jobs_is_one_line(tmp_path, fake_slurm):
    (fake_slurm.parent / "bin" / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
        "exit 1\n")
    executor = sweep_slurm.SlurmExecutor(tmp_path / "jobs", partition="nope").__enter__()
    run = plan({"seed": [0]}, {})[0]
    run.path = tmp_path / "sweep" / "run"
    executor.start(run, run.command(tmp_path / "sweep"), run.path / "run.log")
    with pytest.raises(NormzooError, match="^SLURM did not take the jobs: sbatch: error: Batch job submission "
                                           "failed: Invalid partition name specified$"):
        executor.flush()


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("1:30", 2), ("1:30:00", 90), ("2-0", 2880), ("1-02:03", 1563), ("1-02:03:04", 1564), (" 60 ", 60),
])
def test_time_is_minutes_or_a_slurm_time(text, minutes):
    assert sweep_slurm.slurm_minutes(text) == minutes


@pytest.mark.parametrize("text, message", [
    ("abc", "is not a time limit: give minutes (90) or a SLURM time"), ("1:2:3:4", "is not a time limit"),
    ("1h", "is not a time limit"), ("0", "shorter than a minute"), ("0:59", "shorter than a minute"),
])
def test_a_time_slurm_would_not_take_is_one_line(text, message):
    with pytest.raises(NormzooError, match=re.escape(message)):
        sweep_slurm.slurm_minutes(text)


def test_dry_run_says_what_each_job_requests(tmp_path):
    def dry(*args: str) -> str:
        result = CliRunner().invoke(cli, ["sweep", *DATA, "--norm", "bn,gn:8", "--out", str(tmp_path), "--dry-run",
                                          "--executor", "slurm", *args])
        assert result.exit_code == 0, result.output
        return result.output.splitlines()[0]

    assert dry() == (f"dry run: 2 runs into {tmp_path} (SLURM jobs of 1 CPU, 60 min each, on the default partition; "
                     f"job files in {tmp_path / 'slurm'})")
    assert dry("--slurm-partition", "gpu", "--cpus-per-run", "8", "--gpus-per-run", "1", "--time", "2-00:00:00",
               "--slurm-folder", str(tmp_path / "jobs")) == (
        f"dry run: 2 runs into {tmp_path} (SLURM jobs of 8 CPUs + 1 GPU, 2880 min each, on partition gpu; job files "
        f"in {tmp_path / 'jobs'})")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--executor", "slurm", "--jobs", "2"], "--jobs only with --executor local (SLURM runs as many at once"),
    (["--executor", "slurm", "--address", "auto"], "--address only with --executor ray"),
    (["--slurm-partition", "gpu", "--time", "60"], "--slurm-partition, --time only with --executor slurm"),
    (["--executor", "ray", "--slurm-folder", "x"], "--slurm-folder only with --executor slurm"),
    (["--cpus-per-run", "2"], "--cpus-per-run only with --executor ray or slurm"),
    (["--executor", "slurm", "--cpus-per-run", "0.5"], "--cpus-per-run 0.5 with --executor slurm: a SLURM job takes "
                                                       "a whole number"),
    (["--executor", "slurm", "--gpus-per-run", "0.5"], "--gpus-per-run 0.5 with --executor slurm"),
    (["--executor", "slurm", "--time", "soon"], "--time 'soon' is not a time limit"),
    (["--executor", "slurm", "--device", "cuda:1"], "--device cuda:1 with --executor slurm: SLURM gives each run"),
])
def test_options_slurm_would_not_honour_are_refused(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["sweep", *DATA, "--norm", "bn", "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_without_srun_one_line_says_so_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(cli, ["sweep", *DATA, "--norm", "bn", "--out", str(tmp_path / "s"),
                                      "--executor", "slurm"])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == ("Error: --executor slurm: no SLURM here (srun is not on PATH); run the "
                                              "sweep where sbatch works, a login node say")
    assert not (tmp_path / "s").exists()


def test_without_submitit_installed_one_line_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` raise ImportError
    result = CliRunner().invoke(cli, ["sweep", *DATA, "--norm", "bn", "--out", str(tmp_path / "s"),
                                      "--executor", "slurm"])
    assert result.exit_code == 2
    assert result.output == "Error: --executor slurm needs submitit: pip install 'normzoo[slurm]'\n"
    assert not (tmp_path / "s").exists()
