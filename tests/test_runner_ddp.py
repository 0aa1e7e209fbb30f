"""Data-parallel ``normzoo run`` on CPU (gloo) against single-process runs of the same config.

With a synced norm and ``--batch-size`` as the global batch, two replicas must train the same weights as one
process, and a run must resume on a different number of processes: 2 replicas for steps 1-4 then 1 process for
5-8, and 1 process then 2 replicas, both end where 8 single-process steps end.

The replicas of those two tests are started as torchrun starts its workers: one process per rank with RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (the env:// rendezvous the runner joins), forked from this
test process so that they skip the import of torch. ``torchrun`` itself, with its agent and its handling of Ctrl-C,
runs in the Ctrl-C test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from normzoo import hookimpl
from normzoo.distributed import Replicas
from normzoo.errors import NormzooError
from normzoo.rundir import RunDir
from normzoo.runner import unsynced_norm_note

from conftest import run_normzoo, start_normzoo

# noisy-bn with augmentation: the replicas must also draw the same per-sample randomness as one process.
OPTIONS = ["--backbone", "vgg11,width=0.0625", "--dataset", "synthetic,n=96,n_test=32,size=32,channels=3,classes=4",
           "--norm", "noisy-bn:sync=true", "--batch-size", "16", "--lr", "0.05", "--schedule", "constant", "--augment",
           "--log-every", "2",
           "--eval-every", "4", "--device", "cpu", "--quiet"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def normzoo_run(args: list[str], *, replicas: int = 1) -> list[subprocess.CompletedProcess]:
    """``normzoo run ARGS`` as one process or as ``replicas`` ranks (forked: see ``NormzooProcess``); one result
    per rank."""
    if replicas == 1:
        results = [run_normzoo(["run", *args])]
    else:
        rendezvous = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                      "WORLD_SIZE": str(replicas), "LOCAL_WORLD_SIZE": str(replicas)}
        ranks = [start_normzoo(["run", *args], {**rendezvous, "RANK": str(r), "LOCAL_RANK": str(r)})
                 for r in range(replicas)]
        outputs = [rank.communicate() for rank in ranks]
        results = [subprocess.CompletedProcess(rank.args, rank.returncode, *out) for rank, out in zip(ranks, outputs)]
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
    return results


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "last.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    normzoo_run([*OPTIONS, "--steps", "8", "--out", str(out), "--run-name", "run"])
    return out / "run"


@pytest.mark.slow
def test_two_replicas_then_one_process_equal_one_process(single, tmp_path):
    normzoo_run([*OPTIONS, "--steps", "4", "--out", str(tmp_path), "--run-name", "run", "--probe",
                 "landscape:every=2"], replicas=2)
    run = tmp_path / "run"
    first = records(run)
    assert {"type": "replicas", "step": 0, "world_size": 2, "backend": "gloo"} in first
    probes = [r for r in first if r["type"] == "probe"]
    assert [r["step"] for r in probes] == [0, 2] and all(r["batch_size"] == 8 for r in probes)
    assert all(r["replicas"].startswith("rank 0 of 2 replicas") for r in probes)
    train_losses = {r["step"]: r["loss"] for r in first if r["type"] == "train"}
    single_losses = {r["step"]: r["loss"] for r in records(single) if r["type"] == "train"}
    for step, loss in train_losses.items():  # the logged loss is the global batch's, not rank 0's share
        assert loss == pytest.approx(single_losses[step], rel=1e-4)

    normzoo_run(["--resume", str(run), "--steps", "8", "--quiet"])
    assert_same_weights(run, single)
    assert RunDir(run).read_summary()["world_size"] == "1"


@pytest.mark.slow
def test_one_process_then_two_replicas_equal_one_process(single, tmp_path):
    normzoo_run([*OPTIONS, "--steps", "4", "--out", str(tmp_path), "--run-name", "run"])
    rank0, rank1 = normzoo_run(["--resume", str(tmp_path / "run"), "--steps", "8", "--quiet"], replicas=2)
    assert rank0.stdout.strip() == str(tmp_path / "run") and rank1.stdout == ""  # rank 0 alone prints
    assert_same_weights(tmp_path / "run", single)
    assert [r["step"] for r in records(tmp_path / "run") if r["type"] == "eval"] == [4, 8]
    assert RunDir(tmp_path / "run").read_summary()["world_size"] == "2"


def test_global_batch_must_split_evenly():
    with pytest.raises(NormzooError, match="--batch-size 16 does not split evenly over 3 replicas"):
        Replicas(rank=0, world_size=3).check_batch_size(16)
    Replicas(rank=0, world_size=4).check_batch_size(16)


def test_share_is_the_ranks_rows():
    batch = torch.arange(12)
    assert [Replicas(rank=r, world_size=3).share(batch).tolist() for r in range(3)] == \
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


class NoSyncBatchNorm(torch.nn.BatchNorm2d):
    """A third-party batch norm: declares no traits (so counts as batch-dependent) and takes no sync parameter."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)


class NoSyncPlugin:
    @hookimpl
    def register_norms(self, register):
        register("nosync-bn", NoSyncBatchNorm, summary="batch norm without a sync parameter (tests)")


def test_unsynced_batch_norm_gets_a_note(fresh_plugins):
    fresh_plugins.register(NoSyncPlugin(), name="nz-test-nosync")
    note = unsynced_norm_note("lp:inf", 2, 128)
    assert note and "64-sample share of the 128-sample batch" in note and "lp:inf,sync=true" in note
    assert "bn:sync=true" in unsynced_norm_note("bn", 4, 128)
    assert unsynced_norm_note("nosync-bn", 2, 128).endswith("(it has no sync parameter)")
    for quiet in [("bn:sync=true", 2), ("gn:2", 2), ("noisy-bn:bn=false", 2), ("bn", 1)]:
        assert unsynced_norm_note(quiet[0], quiet[1], 128) is None


@pytest.mark.slow
def test_ctrl_c_stops_every_replica_at_one_step_with_a_checkpoint(tmp_path):
    """SIGINT to torchrun (what a terminal's Ctrl-C reaches): replicas agree on a step, rank 0 saves."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    options = [*OPTIONS, "--steps", "100000", "--out", str(tmp_path), "--run-name", "run"]
    process = subprocess.Popen([*launcher, "-m", "normzoo", "run", *options], start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and '"train"' in log.read_text()):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert "checkpoint saved" in stderr
    status = records(tmp_path / "run")[-1]
    assert status["type"] == "status" and status["status"] == "interrupted"
    stopped = status["step"]
    normzoo_run(["--resume", str(tmp_path / "run"), "--steps", str(stopped + 2), "--quiet"])
    assert RunDir(tmp_path / "run").read_summary()["step"] == str(stopped + 2)
