"""Checkpoints: round trips, metadata, wrapper prefixes, atomic writes and one-line errors for bad files."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from normzoo import hookimpl
from normzoo.checkpoint import load_checkpoint, load_weights, read_checkpoint_info, save_checkpoint
from normzoo.errors import NormzooError
from normzoo.io import atomic_write_json, atomic_write_text, read_safetensors_header

NORMZOO_FILES = [Path(__file__).parents[1] / "normzoo" / name for name in ("io.py", "checkpoint.py", "state.py")]


# -- a tiny plugin: one norm with a running buffer, one backbone (optionally with tied weights) --------------
class TinyNorm(nn.Module):
    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        if self.training:
            mean = x.mean(dims)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
        else:
            mean = self.running_mean
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean.view(shape)) * self.weight.view(shape) + self.bias.view(shape)


class TinyNet(nn.Module):
    def __init__(self, norm_layer, num_classes: int, in_chans: int, width: int, tied: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.norm = norm_layer(width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, num_classes)
        if tied:
            self.mix2 = nn.Linear(width, width)
            self.mix2.weight = self.mix.weight  # tied: one tensor under two keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.conv(x))).mean((2, 3))
        x = self.mix(x)
        if hasattr(self, "mix2"):
            x = self.mix2(torch.relu(x))
        return self.head(x)


def build_tinynet(*, norm_layer, num_classes, in_chans, width: int = 6, tied: bool = False) -> nn.Module:
    return TinyNet(norm_layer, num_classes, in_chans, width, tied)


class TestPlugin:
    @hookimpl
    def register_norms(self, register):
        register("tinynorm", TinyNorm, summary="per-channel centering with a running mean (tests)")

    @hookimpl
    def register_backbones(self, register):
        register("tinynet", build_tinynet, summary="conv + norm + two linears (tests)")


@pytest.fixture
def plugins(fresh_plugins):
    fresh_plugins.register(TestPlugin(), name="nz-test", version="9.9")
    return fresh_plugins


def build(backbone="tinynet", norm="tinynorm", **kwargs):
    from normzoo.models import build_model

    return build_model(backbone, norm, num_classes=kwargs.pop("num_classes", 5), in_chans=3, **kwargs)


def trained(model: nn.Module, steps: int = 3) -> nn.Module:
    """A few SGD steps so that weights and running buffers are not at their initial values."""
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, model.normzoo_config["in_chans"], 8, 8)
        y = torch.randint(0, model.normzoo_config["num_classes"], (4,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


INFO = {"dataset": "synthetic", "classes": ["a", "b", "c", "d", "e"], "input_shape": [3, 8, 8], "step": 3,
        "test_acc": 0.5}


@pytest.fixture
def ckpt(plugins, tmp_path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = trained(build())
    path = save_checkpoint(tmp_path / "model.safetensors", model, info=INFO)
    return path, model


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(NormzooError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# -- round trips ---------------------------------------------------------------------------------------------
def test_round_trip_gives_identical_state_and_outputs(ckpt):
    path, model = ckpt
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    assert_same_state(model, loaded)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert info["step"] == 3 and loaded.normzoo_config == model.normzoo_config


def test_metadata_fields(ckpt):
    path, model = ckpt
    raw = read_safetensors_header(path)["__metadata__"]
    assert list(raw) == ["normzoo"]  # one key holding a JSON string
    info = read_checkpoint_info(path)
    assert info == json.loads(raw["normzoo"])
    from normzoo import __version__

    assert info["format"] == "normzoo-checkpoint" and info["format_version"] == 1
    assert info["normzoo_version"] == __version__
    assert info["backbone"] == "tinynet,width=6,tied=false"
    assert info["norm"] == "tinynorm,eps=1e-05,momentum=0.1,affine=true"
    assert (info["num_classes"], info["in_chans"]) == (5, 3)
    assert info["dataset"] == "synthetic" and info["classes"] == INFO["classes"]
    assert info["input_shape"] == [3, 8, 8] and info["test_acc"] == 0.5 and info["step"] == 3
    assert info["norm_plugin"] == {"name": "nz-test", "version": "9.9", "distribution": None}
    assert info["backbone_plugin"]["name"] == "nz-test"
    assert info["plugin_versions"]["nz-test"] == "9.9"
    assert len(info["tensors_sha256"]) == 64
    detailed = read_checkpoint_info(path, tensors=True)
    assert detailed["tensors"]["conv.weight"] == {"dtype": "F32", "shape": [6, 3, 3, 3]}
    assert detailed["num_parameters"] == sum(t.numel() for t in model.state_dict().values())


def test_load_to_device_and_into_existing_model(ckpt):
    path, model = ckpt
    loaded, _ = load_checkpoint(path, device=torch.device("cpu"))
    assert next(loaded.parameters()).device.type == "cpu"
    target = build()
    info = load_weights(path, target)
    assert info["dataset"] == "synthetic"
    assert_same_state(model, target)


class Wrapper(nn.Module):
    """Stands in for DDP (child ``module``) and torch.compile's OptimizedModule (child ``_orig_mod``)."""

    def __init__(self, inner: nn.Module, attr: str) -> None:
        super().__init__()
        self.add_module(attr, inner)
        self.attr = attr

    def forward(self, x):
        return getattr(self, self.attr)(x)


@pytest.mark.parametrize("attrs", [["module"], ["_orig_mod"], ["module", "_orig_mod"], ["_orig_mod", "module"]])
def test_wrapper_prefixes_are_stripped(plugins, tmp_path, attrs):
    torch.manual_seed(0)
    model = trained(build())
    wrapped: nn.Module = model
    for attr in attrs:
        wrapped = Wrapper(wrapped, attr)
    assert all(k.startswith(f"{attrs[-1]}.") for k in wrapped.state_dict())
    path = save_checkpoint(tmp_path / "w.safetensors", wrapped, info=INFO)
    keys = set(load_file(path))
    assert keys == set(model.state_dict()) and not any("module" in k or "_orig_mod" in k for k in keys)
    loaded, _ = load_checkpoint(path)
    assert_same_state(model, loaded)
    # ...and weights saved unwrapped load into a wrapped model (resuming a compiled/DDP run)
    target = build()
    load_weights(path, Wrapper(target, attrs[0]))
    assert_same_state(model, target)


def test_prefixed_keys_in_a_file_are_stripped_on_load(ckpt, tmp_path):
    path, model = ckpt
    tensors = load_file(path)
    metadata = read_safetensors_header(path)["__metadata__"]
    meta = json.loads(metadata["normzoo"])
    del meta["tensors_sha256"]  # the file is hand-made: no checksum to verify
    save_file({f"module._orig_mod.{k}": v for k, v in tensors.items()}, tmp_path / "p.safetensors",
              metadata={"normzoo": json.dumps(meta)})
    loaded, _ = load_checkpoint(tmp_path / "p.safetensors")
    assert_same_state(model, loaded)


def test_tied_weights_are_stored_once_and_stay_tied(plugins, tmp_path):
    torch.manual_seed(0)
    model = trained(build("tinynet,tied=true"))
    path = save_checkpoint(tmp_path / "tied.safetensors", model, info=INFO)
    stored = load_file(path)
    assert "mix.weight" in stored and "mix2.weight" not in stored
    assert read_checkpoint_info(path)["aliases"] == {"mix2.weight": "mix.weight"}
    loaded, _ = load_checkpoint(path)
    assert_same_state(model, loaded)
    assert loaded.mix2.weight is loaded.mix.weight


def test_extra_state_round_trips(plugins, tmp_path):
    class WithExtra(TinyNorm):
        def get_extra_state(self):
            return {"calls": (1, 2), "scale": float("inf"), "t": torch.arange(3)}

        def set_extra_state(self, state):
            self.restored = state

    torch.manual_seed(0)
    model = build()
    model.norm.__class__ = WithExtra
    path = save_checkpoint(tmp_path / "x.safetensors", model, info=INFO)
    target = build()
    target.norm.__class__ = WithExtra
    load_weights(path, target)
    assert target.norm.restored["calls"] == (1, 2) and target.norm.restored["scale"] == float("inf")
    assert torch.equal(target.norm.restored["t"], torch.arange(3))


def test_checkpoint_of_a_model_on_another_dtype_device_is_cpu_contiguous(plugins, tmp_path):
    torch.manual_seed(0)
    model = build()
    model.head.weight.data = model.head.weight.data.t().contiguous().t()  # non-contiguous parameter
    path = save_checkpoint(tmp_path / "nc.safetensors", model, info=INFO)
    loaded, _ = load_checkpoint(path)
    assert_same_state(model, loaded)


@pytest.mark.parametrize("backbone,norm", [("vgg11,width=0.125", "lp:inf"), ("vgg11,width=0.125", "bn")])
def test_round_trip_with_real_build_model(fresh_plugins, tmp_path, backbone, norm):
    from normzoo.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, norm, num_classes=10, in_chans=3)
    model.train()
    with torch.no_grad():  # a training-mode forward moves the running statistics
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    path = save_checkpoint(tmp_path / "real.safetensors", model, info=INFO | {"input_shape": [3, 32, 32]})
    info = read_checkpoint_info(path)
    assert info["backbone"] == model.normzoo_config["backbone"] and info["norm"] == model.normzoo_config["norm"]
    assert info["norm_plugin"]["name"] == fresh_plugins.registry("norms").get(norm.split(":")[0]).plugin
    loaded, _ = load_checkpoint(path)
    assert_same_state(model, loaded)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


# -- errors --------------------------------------------------------------------------------------------------
def test_missing_file(plugins, tmp_path):
    message = error_of(load_checkpoint, tmp_path / "nope.safetensors")
    assert "not found" in message and "nope.safetensors" in message
    assert "directory" in error_of(load_checkpoint, tmp_path)


@pytest.mark.parametrize("content,words", [
    (b"", "empty"),
    (b"hello world, this is a text file\n" * 3, "not a safetensors file"),
    (os.urandom(4096), "not a safetensors file"),
    (struct.pack("<Q", 20) + b"[1, 2, 3, 4, 5, 6, 7, 8]", "not a safetensors file"),
])
def test_not_a_safetensors_file(plugins, tmp_path, content, words):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    assert words in error_of(load_checkpoint, path)
    assert words in error_of(read_checkpoint_info, path)


def test_torch_save_zip_file_is_refused_without_unpacking(plugins, tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, path)
    message = error_of(load_checkpoint, path)
    assert "zip" in message and "not a safetensors file" in message
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    message = error_of(load_checkpoint, path)
    assert "serialized Python object" in message and "not a safetensors file" in message


def test_truncated_checkpoints(ckpt, tmp_path):
    path, _ = ckpt
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    cuts = {"mid-data": 8 + header_len + (len(data) - 8 - header_len) // 2, "end-of-header": 8 + header_len,
            "mid-header": 8 + header_len // 2, "last byte": len(data) - 1}
    for what, cut in cuts.items():
        bad = tmp_path / f"cut-{cut}.safetensors"
        bad.write_bytes(data[:cut])
        assert "truncated" in error_of(load_checkpoint, bad), what
    bad.write_bytes(data[:5])
    assert "not a safetensors file" in error_of(load_checkpoint, bad)


def test_corrupt_tensor_data_fails_the_checksum(ckpt, tmp_path):
    path, _ = ckpt
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    message = error_of(load_checkpoint, bad)
    assert "corrupt" in message and "checksum" in message
    load_checkpoint(bad, verify=False)  # the check can be skipped


def test_corrupt_header(ckpt, tmp_path):
    path, _ = ckpt
    data = bytearray(path.read_bytes())
    data[9:14] = b"!!!!!"  # inside the JSON header
    bad = tmp_path / "header.safetensors"
    bad.write_bytes(bytes(data))
    assert "corrupt" in error_of(load_checkpoint, bad)
    data = path.read_bytes() + b"\0" * 16
    bad.write_bytes(data)
    assert "corrupt" in error_of(load_checkpoint, bad)


def test_safetensors_without_normzoo_metadata(plugins, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"format": "pt"})
    assert "without normzoo metadata" in error_of(load_checkpoint, path)
    save_file({"w": torch.zeros(2)}, path)
    assert "without normzoo metadata" in error_of(read_checkpoint_info, path)


def rewrite(path: Path, out: Path, *, tensors=None, meta_update=None) -> Path:
    """Copy a checkpoint with changed tensors and/or metadata (plain safetensors, no checksum update)."""
    meta = json.loads(read_safetensors_header(path)["__metadata__"]["normzoo"])
    meta.update(meta_update or {})
    save_file(tensors if tensors is not None else load_file(path), out, metadata={"normzoo": json.dumps(meta)})
    return out


def test_shape_mismatch_is_reported(ckpt, tmp_path):
    path, _ = ckpt
    tensors = load_file(path)
    tensors["head.weight"] = torch.zeros(7, 6)
    message = error_of(load_checkpoint, rewrite(path, tmp_path / "shape.safetensors", tensors=tensors))
    assert "does not fit" in message and "1 shape mismatch" in message
    assert "head.weight [7, 6] in the checkpoint vs [5, 6] in the model" in message


def test_missing_and_unexpected_keys_are_summarised(ckpt, tmp_path):
    path, _ = ckpt
    tensors = load_file(path)
    del tensors["norm.running_mean"], tensors["mix.bias"]
    tensors["extra.layer.weight"] = torch.zeros(1)
    message = error_of(load_checkpoint, rewrite(path, tmp_path / "keys.safetensors", tensors=tensors))
    assert "2 missing keys (mix.bias, norm.running_mean)" in message
    assert "1 unexpected key (extra.layer.weight)" in message


def test_checkpoint_from_a_spec_the_backbone_rejects(ckpt, tmp_path):
    path, _ = ckpt
    bad = rewrite(path, tmp_path / "spec.safetensors", meta_update={"backbone": "tinynet,depth=3"})
    message = error_of(load_checkpoint, bad)
    assert "cannot rebuild" in message and "depth" in message


def test_unregistered_norm_names_its_plugin(ckpt, tmp_path):
    path, _ = ckpt
    bad = rewrite(path, tmp_path / "foo.safetensors", meta_update={
        "norm": "foo:2", "norm_plugin": {"name": "normzoo-foo", "version": "0.1.0", "distribution": "normzoo-foo"}})
    message = error_of(load_checkpoint, bad)
    assert ("norm 'foo' comes from plugin 'normzoo-foo' (version 0.1.0), which is not installed; "
            "pip install normzoo-foo") in message
    info = read_checkpoint_info(bad)  # inspecting needs no plugin
    assert info["norm"] == "foo:2"


def test_unregistered_backbone_and_plugin_that_dropped_a_name(ckpt, tmp_path):
    path, _ = ckpt
    bad = rewrite(path, tmp_path / "bb.safetensors", meta_update={
        "backbone": "bar", "backbone_plugin": {"name": "normzoo-bar", "version": "2.0"}})
    assert "backbone 'bar' comes from plugin 'normzoo-bar' (version 2.0), which is not installed" \
        in error_of(load_checkpoint, bad)
    bad = rewrite(path, tmp_path / "gone.safetensors", meta_update={
        "norm": "gone", "norm_plugin": {"name": "nz-test", "version": "9.8"}})
    assert "installed version 9.9 does not register it" in error_of(load_checkpoint, bad)


def test_load_weights_into_a_model_built_differently(ckpt, tmp_path):
    path, model = ckpt
    other = build(norm="tinynorm,eps=0.001")  # same keys and shapes, different model
    message = error_of(load_weights, path, other)
    assert "another model" in message and "eps=0.001" in message
    load_weights(path, other, check_config=False)
    assert_same_state(model, other)


def test_bad_metadata_values(ckpt, tmp_path):
    path, _ = ckpt
    for update in ({"num_classes": "ten"}, {"norm": ""}, {"in_chans": True}):
        bad = rewrite(path, tmp_path / "meta.safetensors", meta_update=update)
        assert "corrupt" in error_of(load_checkpoint, bad), update
    meta_less = rewrite(path, tmp_path / "less.safetensors")
    raw = json.loads(read_safetensors_header(meta_less)["__metadata__"]["normzoo"])
    del raw["backbone"]
    save_file(load_file(path), meta_less, metadata={"normzoo": json.dumps(raw)})
    assert "lacks backbone" in error_of(read_checkpoint_info, meta_less)
    save_file(load_file(path), meta_less, metadata={"normzoo": "{not json"})
    assert "not valid JSON" in error_of(read_checkpoint_info, meta_less)


def test_newer_format_and_training_state_file_are_refused(ckpt, tmp_path):
    path, _ = ckpt
    bad = rewrite(path, tmp_path / "new.safetensors", meta_update={"format_version": 99})
    assert "upgrade normzoo" in error_of(load_checkpoint, bad)
    from normzoo.state import save_training_state

    state = save_training_state(tmp_path / "last.state.safetensors", None, extra={"step": 1})
    assert "training-state" in error_of(load_checkpoint, state)


def test_saving_needs_normzoo_config(plugins, tmp_path):
    assert "normzoo_config" in error_of(save_checkpoint, tmp_path / "m.safetensors", nn.Linear(2, 2), info={})
    assert not (tmp_path / "m.safetensors").exists()


def test_info_conflicting_with_the_model_is_refused(ckpt, tmp_path):
    _, model = ckpt
    message = error_of(save_checkpoint, tmp_path / "c.safetensors", model, info={"num_classes": 3})
    assert "num_classes" in message
    save_checkpoint(tmp_path / "c.safetensors", model, info={"num_classes": 5})  # repeating is fine


# -- atomic writes -------------------------------------------------------------------------------------------
def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_failed_replace_keeps_the_old_checkpoint(ckpt, monkeypatch):
    path, model = ckpt
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with torch.no_grad():
        model.head.weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, info=INFO)
    assert path.read_bytes() == before and leftovers(path.parent) == []


def test_serializer_failing_mid_write_keeps_the_old_checkpoint(ckpt, monkeypatch):
    import safetensors.torch

    path, model = ckpt
    before = path.read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt  # even an interrupt must not leave a temp file or a half checkpoint

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, info=INFO)
    assert path.read_bytes() == before and leftovers(path.parent) == []


def test_unserializable_info_writes_nothing(plugins, tmp_path):
    model = build()
    message = error_of(save_checkpoint, tmp_path / "m.safetensors", model, info={"bad": object()})
    assert "JSON" in message
    assert list(tmp_path.iterdir()) == []


def test_atomic_text_and_json(tmp_path):
    target = tmp_path / "sub" / "config.json"
    atomic_write_json(target, {"a": 1, "t": torch.tensor(2.5), "p": tmp_path})
    assert json.loads(target.read_text()) == {"a": 1, "t": 2.5, "p": str(tmp_path)}
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text())["a"] == 1 and leftovers(target.parent) == []
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)  # umask, not mkstemp's 0600


def test_no_unsafe_deserialization_in_the_io_modules():
    for path in NORMZOO_FILES:
        text = path.read_text()
        assert "pickle" not in text and "torch.load" not in text, path


@pytest.mark.cuda
def test_cuda_model_round_trip(plugins, tmp_path):
    torch.manual_seed(0)
    model = trained(build(device="cuda").cpu()).cuda()
    path = save_checkpoint(tmp_path / "cuda.safetensors", model, info=INFO)
    loaded, _ = load_checkpoint(path, device="cuda")
    assert next(loaded.parameters()).is_cuda
    assert_same_state(model, loaded)
    cpu_model, _ = load_checkpoint(path)
    assert_same_state(model.cpu(), cpu_model)
