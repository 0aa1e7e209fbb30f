"""The training runner on CPU: run dir contents, exact resume after a real SIGINT, divergence, presets."""

from __future__ import annotations

import csv
import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from normzoo import hookimpl
from normzoo.cli import cli
from normzoo.config import RunConfig, apply_preset
from normzoo.errors import NormzooError
from normzoo.norms import BatchNorm
from normzoo.probe import Probe
from normzoo.runner import BatchSampler, lr_at, resume, train

TINY = dict(backbone="vgg11,width=0.0625", dataset="synthetic,n=96,n_test=32,size=32,channels=3,classes=4",
            batch_size=16, lr=0.05, log_every=2, device="cpu")


class SendSigint(Probe):
    """A probe that interrupts the run the way a user's Ctrl-C does."""

    name = "sigint"

    def measure(self, ctx):
        os.kill(os.getpid(), signal.SIGINT)
        return {}


class InterruptPlugin:
    @hookimpl
    def register_probes(self, register):
        register("sigint", SendSigint, summary="sends SIGINT to this process")


def test_run_writes_a_self_describing_run_dir(tmp_path):
    result = train(RunConfig(**TINY, norm="lp:inf", steps=12, out=str(tmp_path), run_name="r"), quiet=True)
    assert result.status == "finished"
    run = tmp_path / "r"
    config = json.loads((run / "config.json").read_text())
    assert config["norm"].startswith("lp:inf,") and config["backbone"].startswith("vgg11,")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == [2, 4, 6, 8, 10, 12]
    assert all(0 <= r["acc"] <= 1 and r["loss"] > 0 for r in records if r["type"] == "train")
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12]  # once per epoch (96 // 16 = 6 steps)
    summary = next(csv.DictReader((run / "summary.csv").open()))
    assert summary["status"] == "finished" and summary["step"] == "12"
    assert float(summary["test_acc"]) == pytest.approx(evals[-1]["acc"])
    for name in ("last.safetensors", "best.safetensors"):
        assert (run / name).stat().st_size > 0
    assert not list(run.glob("*.tmp*"))
    assert not (run / "run.lock").exists() and not (run / "last.state.safetensors").exists()


def test_interrupted_and_resumed_run_matches_uninterrupted_bitwise(tmp_path, fresh_plugins):
    fresh_plugins.register(InterruptPlugin(), name="interrupt")
    common = dict(TINY, norm="noisy-bn", steps=14, augment=True, momentum=0.9, out=str(tmp_path))
    straight = train(RunConfig(**common, run_name="straight"), quiet=True)
    assert straight.status == "finished"

    interrupted = train(RunConfig(**common, run_name="cut", probes=["sigint:init=false,at=5"]), quiet=True)
    assert interrupted.status == "interrupted" and interrupted.summary["step"] == 6
    resumed = resume(tmp_path / "cut", quiet=True)
    assert resumed.status == "finished" and resumed.summary["step"] == 14

    a = load_file(tmp_path / "straight" / "last.safetensors")
    b = load_file(tmp_path / "cut" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == sorted(set(steps)), "resume must not duplicate records"


def test_divergence_stops_cleanly_with_exit_code_zero(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--backbone", TINY["backbone"], "--dataset", TINY["dataset"],
                                      "--norm", "none", "--lr", "1e6", "--steps", "30", "--batch-size", "16",
                                      "--log-every", "1", "--device", "cpu", "--out", str(tmp_path),
                                      "--run-name", "boom", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "Diverged at step" in result.output
    summary = next(csv.DictReader((tmp_path / "boom" / "summary.csv").open()))
    assert summary["status"] == "diverged" and 1 <= int(summary["diverged_step"]) < 30
    assert "Traceback" not in result.output


def test_cli_run_prints_summary_and_bad_options_fail_in_one_line(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["run", "--backbone", TINY["backbone"], "--dataset", TINY["dataset"], "--norm", "gn:2",
                             "--steps", "3", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "test_acc" in ok.output and "finished" in ok.output
    bad = runner.invoke(cli, ["run", "--norm", "lp:x", "--dataset", TINY["dataset"], "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "must be a number" in bad.output and "Traceback" not in bad.output
    big = runner.invoke(cli, ["run", "--dataset", TINY["dataset"], "--batch-size", "1000", "--steps", "1",
                              "--backbone", TINY["backbone"], "--device", "cpu", "--out", str(tmp_path)])
    assert big.exit_code == 2 and "exceeds the 96 training examples" in big.output


def test_resume_refuses_changed_hyperparameters(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--resume", str(tmp_path), "--lr", "0.3"])
    assert result.exit_code == 2 and "only --steps/--epochs/--device" in result.output


def test_preset_fills_paper_settings_under_explicit_options():
    values = apply_preset("santurkar2018", {"backbone": "vgg11", "lr": 0.5})
    assert values["lr"] == 0.5 and values["momentum"] == 0.0 and values["steps"] == 15_000
    assert values["schedule"] == "constant" and values["backbone"] == "vgg11,glorot=true"
    with pytest.raises(NormzooError, match="did you mean 'santurkar2018'"):
        apply_preset("santurkar2019", {})


def test_batches_are_epoch_permutations():
    sampler = BatchSampler(3, 44, 8, torch.device("cpu"))  # 5 batches per epoch, 4 examples dropped
    seen = torch.cat([sampler(s) for s in range(5)])
    assert len(set(seen.tolist())) == 40 and seen.max() < 44
    fresh = BatchSampler(3, 44, 8, torch.device("cpu"))  # a resumed run starts a new sampler mid-epoch
    assert torch.equal(fresh(7), sampler(7)) and torch.equal(fresh(2), sampler(2))
    assert not torch.equal(sampler(5), sampler(0))  # each epoch its own order


def test_schedules():
    cfg = RunConfig(lr=1.0, schedule="cosine")
    assert lr_at(cfg, 0, 100) == 1.0 and lr_at(cfg, 50, 100) == pytest.approx(0.5)
    cfg.schedule = "step"
    assert [lr_at(cfg, s, 100) for s in (0, 49, 50, 75)] == pytest.approx([1, 1, 0.1, 0.01])


@pytest.mark.cuda
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_cuda_run_uses_bf16_channels_last_and_compiles(tmp_path, compile_mode):
    from normzoo.runner import Trainer, autocast_for

    config = RunConfig(**{**TINY, "device": "cuda"}, norm="lp:inf", steps=8, out=str(tmp_path), run_name="r",
                       compile=compile_mode, eval_every=4)
    trainer = Trainer(config, quiet=True)
    conv = next(p for p in trainer.model.parameters() if p.dim() == 4)
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    assert autocast_for(config, trainer.device)[1] is torch.bfloat16
    result = trainer.fit()
    assert result.status == "finished" and 0 < result.summary["train_loss"] < 10
    for name in ("last.safetensors", "best.safetensors"):
        assert all(t.device.type == "cpu" for t in load_file(tmp_path / "r" / name).values())


class MarkedNorm(BatchNorm):
    """A plugin norm that keeps its shift out of weight decay."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)

    def no_weight_decay(self) -> set[str]:
        return {"bias"}


class MarkedPlugin:
    @hookimpl
    def register_norms(self, register):
        register("marked-bn", MarkedNorm, summary="keeps its bias out of weight decay")


def test_weight_decay_skips_what_a_norm_marks_or_timms_convention(fresh_plugins, tmp_path):
    from normzoo.runner import Trainer, no_decay_parameters

    fresh_plugins.register(MarkedPlugin(), name="nz-marked")
    trainer = Trainer(RunConfig(**TINY, norm="marked-bn", steps=1, out=str(tmp_path), run_name="m"), quiet=True)
    model, groups = trainer.model, trainer.optimizer.param_groups
    biases = {id(m.bias) for m in model.modules() if isinstance(m, MarkedNorm)}
    assert len(groups) == 2 and {id(p) for p in groups[1]["params"]} == biases and groups[1]["weight_decay"] == 0
    trainer.abandon()
    timm_rule = no_decay_parameters(model, "norm-bias")
    assert timm_rule == {id(p) for p in model.parameters() if p.ndim <= 1}  # norm scales, shifts, biases
    assert not no_decay_parameters(model, "none")
    plain = Trainer(RunConfig(**TINY, norm="bn", steps=1, out=str(tmp_path), run_name="p"), quiet=True)
    assert len(plain.optimizer.param_groups) == 1  # nothing marked: the layout of every earlier run
    plain.abandon()


def test_a_run_from_before_decay_skip_resumes_as_it_was(fresh_plugins, tmp_path):
    # Before --decay-skip every parameter decayed, whatever a norm marked. Such a run's config has no decay_skip:
    # it must resume under "none" (one group, everything decayed), not under today's default, "marked".
    fresh_plugins.register(MarkedPlugin(), name="nz-marked")
    common = dict(TINY, norm="marked-bn", eval_every=2, weight_decay=0.05, decay_skip="none", schedule="constant",
                  out=str(tmp_path))
    straight = train(RunConfig(**common, steps=6, run_name="straight"), quiet=True)
    train(RunConfig(**common, steps=4, run_name="old"), quiet=True)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["decay_skip"]  # as an older normzoo wrote it
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert RunConfig.load(tmp_path / "old" / "config.json").decay_skip == "none"
    resumed = resume(tmp_path / "old", quiet=True, steps=6)
    a, b = load_file(straight.run_dir / "last.safetensors"), load_file(resumed.run_dir / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("training_state.extra."))
    assert RunConfig(norm="bn").decay_skip == "marked"  # new runs honour what a norm marks


def test_resume_names_the_plugin_a_run_needs(fresh_plugins, tmp_path):
    fresh_plugins.register(MarkedPlugin(), name="nz-marked", version="1.2")
    train(RunConfig(**TINY, norm="marked-bn", steps=2, out=str(tmp_path), run_name="r"), quiet=True)
    fresh_plugins.unregister("nz-marked")
    with pytest.raises(NormzooError, match="norm 'marked-bn' comes from plugin 'nz-marked' \\(version 1.2\\), "
                                           "which is not installed"):
        resume(tmp_path / "r", quiet=True, steps=4)
