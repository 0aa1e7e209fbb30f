"""``normzoo sweep --executor ray``: the same folders, skip/resume/retry and Ctrl-C semantics, on a local Ray instance
that this module starts (the sweeps connect to it with ``--address``, as they would to a cluster)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from click.testing import CliRunner, Result

# As normzoo.sweep_ray does before importing Ray: under `uv run` Ray would otherwise ship this repository to its
# workers and start them with `uv run`.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
ray = pytest.importorskip("ray")

from normzoo import sweep_ray  # noqa: E402
from normzoo.cli import cli  # noqa: E402
from normzoo.sweep import plan  # noqa: E402
from test_sweep import TINY, interrupt_then_resume, isolate_skip_retry  # noqa: E402


@pytest.fixture(scope="module")
def address():
    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, log_to_driver=False)
    yield context.address_info["address"]
    ray.shutdown()


def sweep_here(*args: str) -> Result:
    """The sweep in this process, on this module's Ray connection (its runs are the Ray tasks' processes)."""
    return CliRunner().invoke(cli, ["sweep", *TINY, *args])


@pytest.mark.slow
def test_ray_sweep_isolates_failures_then_skips_and_retries(address, tmp_path):
    out = tmp_path / "sweep"
    grid = ["--norm", "none", "--steps", "6", "--batch-size", "16,20000", "--executor", "ray", "--address", address,
            "--out", str(out)]

    def check_first(first: Result) -> None:
        assert f"(Ray tasks of 1 CPU each, on Ray at {address})" in first.output
        record = json.loads((out / "batch-size-16" / "sweep-run.json").read_text())
        assert record["command"].startswith("normzoo run --backbone") and record["failed"] is None
        assert (out / "batch-size-16" / "best.safetensors").exists()

    isolate_skip_retry(sweep_here, grid, out, 20000, 10000, check_first)


@pytest.mark.slow
def test_ctrl_c_checkpoints_ray_runs_and_the_same_command_resumes_them(address, tmp_path):
    # the task passes Ray's cancel on to its run as SIGTERM, so the run saves a checkpoint
    interrupt_then_resume(tmp_path / "sweep", ["--steps", "200", "--batch-size", "32", "--executor", "ray",
                                               "--address", address],
                          fresh=True, resume_here=True)  # fresh: a process connected to Ray must not be forked


def test_dry_run_says_which_executor_and_resources(tmp_path, monkeypatch):
    def dry(*args: str) -> str:
        result = CliRunner().invoke(cli, ["sweep", *TINY, "--norm", "bn,gn:8", "--out", str(tmp_path), "--dry-run",
                                          *args])
        assert result.exit_code == 0, result.output
        return result.output.splitlines()[0]

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert dry("--executor", "ray") == (f"dry run: 2 runs into {tmp_path} (Ray tasks of 1 CPU each, on a new local "
                                        f"Ray instance)")
    assert dry("--executor", "ray", "--cpus-per-run", "2", "--gpus-per-run", "0.5", "--address", "ray://head:10001"
               ).endswith("(Ray tasks of 2 CPUs + 0.5 GPU each, on Ray at ray://head:10001)")
    assert dry("--jobs", "2") == f"dry run: 2 runs into {tmp_path} (2 at a time)"
    assert not list(tmp_path.iterdir())


def test_a_run_on_cuda_requests_one_gpu_by_default(monkeypatch):
    runs = plan({"device": ["cpu", "cuda", "cuda:1", "auto"]}, {})
    executor = sweep_ray.RayExecutor()
    monkeypatch.setattr("normzoo.sweep.driver_sees_cuda", lambda: False)
    assert [executor.request(r)["num_gpus"] for r in runs] == [0, 1, 1, 0]
    monkeypatch.setattr("normzoo.sweep.driver_sees_cuda", lambda: True)
    assert [executor.request(r)["num_gpus"] for r in runs] == [0, 1, 1, 1]
    assert executor.describe(runs[:2]).startswith("Ray tasks of 1 CPU (1 run), 1 CPU + 1 GPU (1 run) each")
    assert sweep_ray.RayExecutor(gpus_per_run=0).request(runs[1]) == {"num_cpus": 1.0, "num_gpus": 0}


@pytest.mark.parametrize("args, message", [
    (["--address", "auto"], "--address only with --executor ray"),
    (["--cpus-per-run", "2", "--gpus-per-run", "1"], "--cpus-per-run, --gpus-per-run only with --executor ray"),
    (["--executor", "ray", "--jobs", "2"], "--jobs only with --executor local (Ray runs as many at once"),
    (["--executor", "ray", "--device", "cuda:1"], "--device cuda:1 with --executor ray: Ray gives each run"),
])
def test_options_of_the_other_executor_are_refused(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["sweep", *TINY, "--norm", "bn", "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "s").exists()


def test_without_ray_installed_one_line_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    result = CliRunner().invoke(cli, ["sweep", *TINY, "--norm", "bn", "--out", str(tmp_path / "s"),
                                      "--executor", "ray"])
    assert result.exit_code == 2
    assert result.output == "Error: --executor ray needs Ray: pip install 'normzoo[ray]'\n"
    assert not (tmp_path / "s").exists()


def test_an_address_nothing_listens_on_fails_fast_and_writes_nothing(tmp_path, monkeypatch):
    import socket

    with socket.socket() as closed:  # a port that was free a moment ago: nothing accepts connections on it
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # not this module's instance, if it was started here
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["sweep", *TINY, "--norm", "bn", "--out", str(tmp_path / "s"),
                                      "--executor", "ray", "--address", f"127.0.0.1:{port}"])
    assert result.exit_code == 2 and time.perf_counter() - started < 30
    assert f"could not connect to Ray at 127.0.0.1:{port}: nothing accepts connections" in result.output
    assert not (tmp_path / "s").exists()
