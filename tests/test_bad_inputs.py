"""Every bad input is one line on stderr and a non-zero exit, never a traceback (``--debug`` still shows it).

One table of real command-line calls (click's runner, in this process): the cases users hit, then a row for every
numeric parameter of every registered norm, backbone, dataset and probe (plugins included) given values outside
its declared range. Exit code 2 is bad input; 1 is a run that could not go on (out of memory, a plugin's code).
A run that fails before its first step leaves nothing behind in ``--out``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

from normzoo import hookimpl
from normzoo.cli import cli
from normzoo.plugins import get_plugins, reset_plugins
from normzoo.probe import Probe

DATA = "synthetic,n=64,n_test=16,size=32,channels=3,classes=4"
RUN = ["run", "--backbone", "vgg11,width=0.0625", "--dataset", DATA, "--batch-size", "16", "--steps", "2",
       "--device", "cpu", "--quiet"]


class WrongShape(nn.Module):
    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__()

    def forward(self, x):
        return x[:, :1]


class OutOfMemoryNorm(nn.Identity):
    """Fine on the small input normzoo checks a norm with, out of memory on a real batch."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True, device=None, dtype=None):
        super().__init__()

    def forward(self, x):
        if x.shape[0] > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return x


class RaisingProbe(Probe):
    name = "raises"

    def measure(self, ctx):
        raise ZeroDivisionError("division by zero in my probe")


class TensorProbe(Probe):
    name = "tensor-values"

    def measure(self, ctx):
        return {"value": torch.ones(2)}


class BadPlugin:
    @hookimpl
    def register_norms(self, register):
        register("wrong-shape", WrongShape, summary="returns one channel")
        register("oom-norm", OutOfMemoryNorm, summary="runs out of memory")

    @hookimpl
    def register_probes(self, register):
        register("raises", RaisingProbe, summary="raises")
        register("tensor-values", TensorProbe, summary="returns a tensor")


@pytest.fixture
def bad_plugin(fresh_plugins):
    fresh_plugins.register(BadPlugin(), name="nz-bad", version="0.1")
    return fresh_plugins


def invoke(args: list[str], tmp_path: Path):
    return CliRunner().invoke(cli, [a.replace("{tmp}", str(tmp_path)) for a in args])


def assert_one_line(result, code: int, words: str) -> None:
    __tracebackhide__ = True
    err = result.stderr.strip()
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}: {result.output}"
    assert "Traceback" not in result.output and "\n" not in err, result.output
    assert err.startswith("Error: ") and len(err) < 600, err
    assert words in err, err


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A real 1-channel checkpoint (fashion-mnist-mini shapes) of a tiny model."""
    from normzoo.checkpoint import save_checkpoint
    from normzoo.models import build_model

    model = build_model("vgg11,width=0.0625", "bn", num_classes=10, in_chans=1)
    info = {"dataset": "fashion-mnist-mini,pad=2", "classes": [str(i) for i in range(10)], "input_shape": [1, 32, 32],
            "step": 1}
    return save_checkpoint(tmp_path / "one-channel.safetensors", model, info=info)


def edit_metadata(path: Path, **changes: object) -> Path:
    """The same tensors under metadata that says something else (what a tampered file does)."""
    from normzoo.io import read_safetensors_header

    meta = json.loads(read_safetensors_header(path)["__metadata__"]["normzoo"])
    meta.update(changes)
    target = path.with_name(f"edited-{len(list(path.parent.iterdir()))}.safetensors")
    save_file(load_file(path), target, metadata={"normzoo": json.dumps(meta)})
    return target


CASES = [
    # (id, extra arguments to the run command, exit code, words in the message)
    ("gn groups 0", ["--norm", "gn:0"], 2, "'groups' must be ≥ 1"),
    ("bn eps negative", ["--norm", "bn,eps=-1"], 2, "'eps' must be ≥ 0"),
    ("vgg width inf", ["--backbone", "vgg11,width=inf"], 2, "'width' must be > 0 and ≤ 8"),
    ("compile mode", ["--compile", "bogus-mode"], 2, "--compile mode must be one of"),
    ("huge seed", ["--seed", "99999999999999999999999"], 2, "--seed must be in 0..4294967295"),
    ("lr nan", ["--lr", "nan"], 2, "--lr must be a finite number"),
    ("lr inf", ["--lr", "inf"], 2, "--lr must be a finite number"),
    ("momentum nan", ["--momentum", "nan"], 2, "--momentum must be in [0, 1]"),
    ("weight decay inf", ["--weight-decay", "inf"], 2, "--weight-decay must be a finite number"),
    ("run name climbs out", ["--run-name", "../../x"], 2, "contains a path separator"),
    ("absolute run name", ["--run-name", "/tmp/x"], 2, "contains a path separator"),
    ("run name dot-dot", ["--run-name", ".."], 2, "is '.' or '..'"),
    ("5 MB spec", ["--norm", "bn,eps=" + "1" * 5_000_000], 2, "characters long"),
    ("unknown 5 MB family", ["--norm", "x" * 5_000_000], 2, "characters long"),
]


@pytest.mark.parametrize("args, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_run_options_are_one_line(tmp_path, args, code, words):
    result = invoke([*RUN, "--out", "{tmp}/runs", *args], tmp_path)
    assert_one_line(result, code, words)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line(invoke([*RUN, "--out", "{tmp}/file"], tmp_path), 2, "is a file, not a folder")


PLUGIN_CASES = [
    ("norm with the wrong output shape", ["--norm", "wrong-shape"], 1,
     "norm 'wrong-shape' (plugin 'nz-bad') returned (4, 1, 3, 3) for a (4, 4, 3, 3) input"),
    ("out of memory in a forward", ["--norm", "oom-norm"], 1, "out of memory"),
    ("probe that raises", ["--probe", "raises"], 1,
     "probe 'raises' (plugin 'nz-bad') raised at step 0: ZeroDivisionError: division by zero in my probe"),
    ("probe returning a tensor", ["--probe", "tensor-values"], 1,
     "probe 'tensor-values' (plugin 'nz-bad') returned a value that is not JSON-serialisable"),
]


@pytest.mark.parametrize("args, code, words", [c[1:] for c in PLUGIN_CASES], ids=[c[0] for c in PLUGIN_CASES])
def test_failing_plugin_code_is_one_line_naming_the_plugin(tmp_path, bad_plugin, args, code, words):
    result = invoke([*RUN, "--out", "{tmp}/runs", *args], tmp_path)
    assert_one_line(result, code, words)
    assert not any((tmp_path / "runs").iterdir())  # failed before its first step: no half-made folder


def test_debug_shows_the_traceback(tmp_path, bad_plugin, monkeypatch):
    monkeypatch.setenv("NORMZOO_DEBUG", "")  # --debug sets it for the process; this puts it back afterwards
    result = CliRunner().invoke(cli, ["--debug", *RUN, "--out", str(tmp_path), "--probe", "raises"])
    assert result.exit_code != 0 and isinstance(result.exception, Exception)
    assert "ZeroDivisionError" in repr(result.exception.__cause__) or "ZeroDivisionError" in repr(result.exception)


def test_eval_of_a_one_channel_checkpoint_on_three_channel_data(tmp_path, checkpoint):
    result = invoke(["eval", str(checkpoint), "--dataset", "synthetic", "--device", "cpu"], tmp_path)
    assert_one_line(result, 2, "3-channel inputs [3, 32, 32] but the checkpoint's model takes 1 channel(s)")


def test_checkpoint_metadata_is_checked_before_anything_is_allocated(tmp_path, checkpoint, monkeypatch):
    import normzoo.models

    built = []
    real = normzoo.models.build_model
    monkeypatch.setattr(normzoo.models, "build_model",
                        lambda *a, **k: built.append(str(k.get("device"))) or real(*a, **k))
    for changes, words in [({"backbone": "vgg11,width=8.0,glorot=false"}, "shape mismatch"),
                           ({"num_classes": 10**12}, "classifier.weight [10, 32] in the checkpoint vs "
                                                     "[1000000000000, 32] in the model"),
                           ({"backbone": "vgg11,width=1000"}, "'width' must be > 0 and ≤ 8"),
                           ({"backbone": "vgg11," + "w" * 5_000_000}, "characters long"),
                           ({"num_classes": 1e12}, "bad num_classes")]:
        built.clear()
        result = invoke(["eval", str(edit_metadata(checkpoint, **changes)), "--device", "cpu"], tmp_path)
        assert_one_line(result, 2, words)
        assert all(device == "meta" for device in built), built  # nothing real was built for a lying file


def test_eval_never_downloads_a_dataset_the_checkpoint_names(tmp_path, checkpoint, monkeypatch):
    from normzoo.data import cifar

    def no_download(*args):
        raise AssertionError("eval tried to download")

    monkeypatch.setattr(cifar, "_download", no_download)
    monkeypatch.setenv("NORMZOO_DATA", str(tmp_path / "empty"))
    edited = edit_metadata(checkpoint, dataset="cifar10", in_chans=3)
    result = invoke(["eval", str(edited), "--device", "cpu"], tmp_path)
    assert result.exit_code == 2 and "download=false" in result.stderr or "does not fit" in result.stderr, \
        result.output
    huge = edit_metadata(checkpoint, dataset="synthetic,n=2000000000,channels=1")
    assert_one_line(invoke(["eval", str(huge), "--device", "cpu"], tmp_path), 2, "more than this machine's")


def test_malformed_run_files_are_one_line(tmp_path):
    assert invoke([*RUN, "--norm", "bn", "--out", "{tmp}", "--run-name", "r"], tmp_path).exit_code == 0
    config = tmp_path / "r" / "config.json"
    text = config.read_text()
    config.write_text(text[:40])
    assert_one_line(invoke(["run", "--resume", "{tmp}/r"], tmp_path), 2, "config.json is not valid JSON")
    config.write_text(json.dumps({**json.loads(text), "lr": "fast"}))
    assert_one_line(invoke(["run", "--resume", "{tmp}/r"], tmp_path), 2, "'lr' must be a number")
    config.write_text("[1, 2]")
    assert_one_line(invoke(["run", "--resume", "{tmp}/r"], tmp_path), 2, "must hold a JSON object")


def test_malformed_sweep_run_record_is_one_line(tmp_path):
    sweep = [a for a in RUN if a != "run"]
    args = ["sweep", *sweep, "--norm", "bn", "--out", "{tmp}/s"]
    assert invoke(args, tmp_path).exit_code == 0
    (tmp_path / "s" / "run" / "sweep-run.json").write_text("{not json")
    assert_one_line(invoke(args, tmp_path), 2, "sweep-run.json is not valid JSON")
    (tmp_path / "s" / "run" / "sweep-run.json").write_text("[]")
    assert_one_line(invoke(args, tmp_path), 2, "sweep-run.json is damaged")


# -- every declared range of every registered parameter -----------------------------------------------------------
def out_of_range(param) -> list[str]:
    """Texts just outside ``param``'s declared range, plus the values no number parameter may take."""
    bounds, texts = param.range, []
    if bounds.low is not None:
        texts.append(param.format(bounds.low if bounds.low_open else bounds.low - 1 if param.type is int
                                  else bounds.low - max(abs(bounds.low), 1) * 1e-3))
    if bounds.high is not None:
        texts.append(param.format(bounds.high if bounds.high_open else bounds.high + 1 if param.type is int
                                  else bounds.high * 1.001 + 1e-9))
        texts.append("99999999999999999999999")
    if param.type is float:
        texts += ["nan"] + ([] if bounds.inf else ["inf"]) + ["-inf"]
    return texts


def registered_rows() -> list[tuple[str, str, str]]:
    reset_plugins()
    rows = []
    option = {"norms": "--norm", "backbones": "--backbone", "datasets": "--dataset", "probes": "--probe"}
    for kind, flag in option.items():
        for entry in get_plugins().registry(kind):
            for param in entry.params:
                if param.range is None:
                    continue
                for text in out_of_range(param):
                    head = f"{entry.name}:resnet18" if entry.name == "timm" else entry.name
                    rows.append((flag, f"{head},{param.name}={text}", f"'{param.name}' must"))
    reset_plugins()
    return rows


ROWS = registered_rows()


def test_every_registered_family_declares_its_ranges():
    families = {spec.split(",")[0].split(":")[0] for _, spec, _ in ROWS}
    for expected in ("bn", "lp", "gn", "noisy-bn", "topk-bn", "timm-evonorm-s0", "mean-bn", "vgg11", "resnet20",
                     "dln", "synthetic", "gaussian-regression", "fashion-mnist-mini", "landscape", "hessian",
                     "weight-norm"):
        assert expected in families, expected
    assert len(ROWS) > 150


@pytest.mark.parametrize("flag, spec, words", ROWS, ids=[r[1][:60] for r in ROWS])
def test_registered_parameters_out_of_range_are_one_line(tmp_path, flag, spec, words):
    result = invoke([*RUN, "--out", "{tmp}/runs", flag, spec], tmp_path)
    assert_one_line(result, 2, words)
    assert not (tmp_path / "runs").exists()  # refused while parsing, before anything was written


def test_a_value_just_inside_every_range_parses():
    reset_plugins()
    for kind in ("norms", "backbones", "datasets", "probes"):
        registry = get_plugins().registry(kind)
        for entry in registry:
            for param in entry.params:
                if param.range is None or param.range.low is None:
                    continue
                low = param.range.low + (1 if param.type is int else 1e-6) * param.range.low_open
                value = registry.parse(f"{entry.name},{param.name}={param.format(low)}").kwargs[param.name]
                assert math.isclose(value, low), (entry.name, param.name)
    reset_plugins()
