"""Experiment trackers: TensorBoard read back with tensorboard's own reader, W&B offline read back from its run
file, one tracker run per sweep run, a tracker that raises never stops a run, and one line when one is missing."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from normzoo import hookimpl
from normzoo.cli import cli
from normzoo.config import RunConfig
from normzoo.loggers import Logger
from normzoo.rundir import RunDir
from normzoo.runner import resume, train

TINY = dict(backbone="vgg11,width=0.0625", dataset="synthetic,n=64,n_test=16,size=32,channels=3,classes=4",
            batch_size=16, lr=0.05, log_every=2, eval_every=4, device="cpu", schedule="constant")


def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_train_eval_and_probe_scalars_and_the_config(tmp_path):
    train(RunConfig(**TINY, norm="lp:inf", steps=8, out=str(tmp_path), run_name="tb", loggers=["tensorboard"],
                    probes=["landscape:every=4,steps=3"]), quiet=True)
    scalars = event_scalars(tmp_path / "tb" / "tensorboard")
    records = RunDir(tmp_path / "tb").read_log()
    train_loss = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in train_loss] == [2, 4, 6, 8]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in train_loss], rel=1e-6)
    assert [s for s, _ in scalars["eval/acc"]] == [4, 8]
    assert [s for s, _ in scalars["probe/landscape/beta"]] == [0, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert "hparams" in events.PluginTagToContent("hparams") or events.PluginTagToContent("hparams")


class Interrupt(Logger):
    """Ends the run at step 4 the way Ctrl-C does."""

    def log(self, record):
        if record.get("type") == "train" and record["step"] == 4:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


class Raises(Logger):
    calls = 0

    def log(self, record):
        Raises.calls += 1
        raise ConnectionError("tracker server unreachable")


class TestLoggers:
    @hookimpl
    def register_loggers(self, register):
        register("interrupt", Interrupt, summary="Ctrl-C at step 4 (tests)")
        register("raises", Raises, summary="raises at every record (tests)")


def test_a_resumed_run_has_one_tensorboard_history(tmp_path, fresh_plugins):
    fresh_plugins.register(TestLoggers(), name="nz-test-loggers")
    cut = train(RunConfig(**TINY, norm="bn", steps=8, out=str(tmp_path), run_name="r",
                          loggers=["tensorboard", "interrupt"]), quiet=True)
    assert cut.status == "interrupted" and cut.summary["step"] == 5  # the step after the signal
    assert resume(tmp_path / "r", quiet=True, loggers=["tensorboard"]).status == "finished"
    scalars = event_scalars(tmp_path / "r" / "tensorboard")
    logged = [r["step"] for r in RunDir(tmp_path / "r").read_log() if r["type"] == "train"]
    assert [s for s, _ in scalars["train/loss"]] == logged == [2, 4, 5, 6, 8]  # nothing twice, nothing missing


def wandb_records(run: Path) -> list:
    """The records of a W&B offline run file (LevelDB log blocks of W&B's protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, chunks, records = 7, 32768, [], []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        position += 7
        if kind == 0 and length == 0:
            break
        chunks.append(data[position:position + length])
        position += length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def test_wandb_runs_offline_into_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train(RunConfig(**TINY, norm="gn:2", steps=4, out=str(tmp_path), run_name="wb", loggers=["wandb"]), quiet=True)
    records = wandb_records(tmp_path / "wb")
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: item.value_json for item in start.config.update}
    assert start.display_name == "wb" and config["norm"].startswith('"gn:2')
    history = [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    steps = {int(h["_step"]): h for h in history if "_step" in h}
    logged = {r["step"]: r["loss"] for r in RunDir(tmp_path / "wb").read_log() if r["type"] == "train"}
    assert {s: float(steps[s]["train/loss"]) for s in logged} == pytest.approx(logged)
    assert "eval/acc" in steps[4]


def test_a_sweep_gives_one_tensorboard_run_per_run_named_by_what_varies(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["sweep", "--backbone", TINY["backbone"], "--dataset", TINY["dataset"],
                                      "--norm", "bn,gn:2", "--steps", "2", "--batch-size", "16", "--device", "cpu",
                                      "--log", "tensorboard", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    runs = sorted(p.parent.parent.name for p in out.glob("*/tensorboard/events.out.tfevents.*"))
    assert runs == ["norm-bn", "norm-gn_2"]
    assert event_scalars(out / "norm-bn" / "tensorboard")["train/loss"]


def test_a_logger_that_raises_is_reported_once_and_the_run_goes_on(tmp_path, fresh_plugins, capsys):
    fresh_plugins.register(TestLoggers(), name="nz-test-loggers")
    Raises.calls = 0
    result = train(RunConfig(**TINY, norm="bn", steps=6, out=str(tmp_path), run_name="r", loggers=["raises"]),
                   quiet=True)
    assert result.status == "finished" and Raises.calls == 1
    err = capsys.readouterr().err
    assert err.count("logger 'raises' (plugin 'nz-test-loggers') raised in log(): ConnectionError") == 1
    assert [r["step"] for r in RunDir(tmp_path / "r").read_log() if r["type"] == "train"] == [2, 4, 6]


def test_listed_like_the_other_registries_and_a_missing_package_is_one_line(monkeypatch, tmp_path):
    listing = CliRunner().invoke(cli, ["loggers"])
    assert listing.exit_code == 0 and "tensorboard" in listing.output and "wandb" in listing.output
    plugins = CliRunner().invoke(cli, ["plugins"])
    assert "loggers" in plugins.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = CliRunner().invoke(cli, ["run", "--backbone", TINY["backbone"], "--dataset", TINY["dataset"],
                                      "--steps", "1", "--batch-size", "16", "--device", "cpu", "--log", "wandb",
                                      "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--log wandb needs the wandb package, which is not installed: pip install 'normzoo[wandb]'" in result.stderr
    assert not any(tmp_path.iterdir())
    assert sys.modules.get("normzoo.loggers") is not None
