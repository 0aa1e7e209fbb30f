"""Exact resume without pickle: optimizer state, RNG states, generators and the runner's own counters."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from normzoo.errors import NormzooError
from normzoo.state import (load_training_state, optimizer_state_from_tensors, optimizer_state_to_tensors,
                           read_training_state_info, restore_rng_state, rng_state_to_tensors,
                           save_training_state)

OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "sgd-dampening": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99)),
    "adam-amsgrad-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
}


def make_model(device: str = "cpu") -> nn.Module:
    # Dropout draws from the global RNG, so the resumed run only matches if the RNG state is restored too.
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)).to(device)


def param_groups(model: nn.Module) -> list[dict]:
    # Two groups with different hyperparameters, like a runner that exempts norms from weight decay.
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay}, {"params": rest, "lr": 0.02, "weight_decay": 0.0}]


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, device: str = "cpu") -> None:
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 6, device=device)  # batches come from the global RNG
        y = torch.randint(0, 3, (8,), device=device)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_resume_check(tmp_path: Path, name: str, device: str = "cpu") -> None:
    torch.manual_seed(0)
    model = make_model(device)
    opt = OPTIMIZERS[name](param_groups(model))
    train(model, opt, 4, device)
    weights = snapshot(model)
    path = save_training_state(tmp_path / "last.state.safetensors", opt, extra={"step": 4})
    train(model, opt, 5, device)  # the uninterrupted run
    expected = snapshot(model)
    expected_opt = opt.state_dict()

    torch.manual_seed(123)  # a fresh process would have some other RNG state
    resumed = make_model(device)
    resumed.load_state_dict(weights)
    fresh_opt = OPTIMIZERS[name](param_groups(resumed))
    extra = load_training_state(path, fresh_opt)
    assert extra == {"step": 4}
    train(resumed, fresh_opt, 5, device)
    assert_bit_identical(expected, snapshot(resumed))
    for i, state in expected_opt["state"].items():
        for key, value in state.items():
            got = fresh_opt.state_dict()["state"][i][key]
            assert torch.equal(value, got) if torch.is_tensor(value) else value == got, (i, key)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_is_bit_identical(tmp_path, name):
    run_resume_check(tmp_path, name)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["sgd-momentum-wd", "adam"])
def test_resume_is_bit_identical_on_cuda(tmp_path, name):
    torch.cuda.init()
    run_resume_check(tmp_path, name, "cuda")


def test_optimizer_state_split_and_join():
    model = make_model()
    opt = torch.optim.Adam(param_groups(model), lr=1e-3, betas=(0.9, 0.95))
    train(model, opt, 2)
    tensors, meta = optimizer_state_to_tensors(opt)
    json.dumps(meta, allow_nan=False)  # strictly JSON
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(tensors)
    assert meta["class"] == "torch.optim.adam.Adam"
    back = optimizer_state_from_tensors(tensors, json.loads(json.dumps(meta)))
    original = opt.state_dict()
    assert back["param_groups"] == original["param_groups"]
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    assert list(back["state"]) == list(original["state"])  # int keys stay ints, in order
    for i in original["state"]:
        for key, value in original["state"][i].items():
            assert torch.equal(back["state"][i][key], value)

    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, sgd, 1)
    tensors, meta = optimizer_state_to_tensors(sgd)
    assert "state.0.momentum_buffer" in tensors


def test_extra_round_trips_exactly(tmp_path):
    extra = {"step": 7, "best": None, "loss": 0.1 + 0.2, "inf": float("inf"), "ninf": -math.inf,
             "nested": {"t": (1, 2.5, "x"), 3: "int key", "l": [1, [2, (3,)]]}, "w": torch.arange(4.0),
             "np": np.arange(3, dtype=np.int32), "flag": True, "scaler": torch.amp.GradScaler("cpu").state_dict()}
    path = save_training_state(tmp_path / "s.safetensors", None, extra=extra, rng=False)
    back = load_training_state(path, None)
    w, arr = back.pop("w"), back.pop("np")
    assert torch.equal(w, extra["w"]) and arr.dtype == np.int32 and arr.tolist() == [0, 1, 2]
    assert back == {k: v for k, v in extra.items() if k not in ("w", "np")}
    assert isinstance(back["nested"]["t"], tuple) and 3 in back["nested"]
    nan = load_training_state(save_training_state(tmp_path / "n.safetensors", None, extra={"x": math.nan}), None)
    assert math.isnan(nan["x"])


def draw() -> tuple:
    return (torch.rand(5), torch.randn(3), random.random(), random.gauss(0, 1), np.random.rand(4).tolist(),
            np.random.randn(3).tolist())


def test_rng_round_trip():
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian (gauss_next) in python's state
    np.random.randn(1)  # and in numpy's
    state = rng_state_to_tensors()
    assert {"torch.cpu", "python.state", "python.gauss", "numpy.key", "numpy.pos", "numpy.gauss"} <= set(state)
    first = draw()
    restore_rng_state(state)
    second = draw()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[2:] == second[2:]


def test_rng_and_generators_round_trip_through_the_file(tmp_path):
    gen = torch.Generator().manual_seed(11)
    torch.rand(1, generator=gen)
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    path = save_training_state(tmp_path / "s.safetensors", None, generators={"data": gen})
    first = draw(), torch.randperm(10, generator=gen)
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    other = torch.Generator().manual_seed(0)
    load_training_state(path, None, generators={"data": other})
    second = draw(), torch.randperm(10, generator=other)
    assert torch.equal(first[1], second[1]) and torch.equal(first[0][0], second[0][0])
    assert first[0][2:] == second[0][2:]
    assert read_training_state_info(path)["generators"] == ["data"]
    message = _error(load_training_state, path, None, generators={"loader": other})
    assert "no state for generator 'loader'" in message and "data" in message


def test_restore_rng_can_be_skipped(tmp_path):
    torch.manual_seed(0)
    path = save_training_state(tmp_path / "s.safetensors", None)
    torch.manual_seed(1)
    expected = torch.get_rng_state()
    load_training_state(path, None, restore_rng=False)
    assert torch.equal(torch.get_rng_state(), expected)


@pytest.mark.cuda
def test_cuda_rng_round_trip():
    torch.cuda.init()
    torch.cuda.manual_seed_all(4)
    state = rng_state_to_tensors()
    assert "torch.cuda.0" in state
    first = torch.rand(4, device="cuda")
    restore_rng_state(state)
    assert torch.equal(first, torch.rand(4, device="cuda"))


def test_file_layout(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 1)
    path = save_training_state(tmp_path / "s.safetensors", opt, extra={"step": 1})
    keys = set(load_file(path))
    assert "optimizer.state.0.momentum_buffer" in keys and "rng.torch.cpu" in keys
    info = read_training_state_info(path)
    assert info["format"] == "normzoo-training-state" and info["extra"] == {"step": 1}
    assert info["optimizer"]["state_dict"]["param_groups"][0]["momentum"] == 0.9


# -- errors --------------------------------------------------------------------------------------------------
def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(NormzooError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_wrong_optimizer_class_or_parameters(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 1)
    path = save_training_state(tmp_path / "s.safetensors", opt)
    message = _error(load_training_state, path, torch.optim.Adam(model.parameters()))
    assert "SGD" in message and "Adam" in message
    smaller = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert "does not fit this optimizer" in _error(load_training_state, path, smaller)
    assert "no optimizer state" in _error(
        load_training_state, save_training_state(tmp_path / "none.safetensors", None), smaller)


def test_bad_state_files(tmp_path):
    assert "not found" in _error(load_training_state, tmp_path / "missing", None)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, 1)
    path = save_training_state(tmp_path / "s.safetensors", opt)
    data = bytearray(path.read_bytes())
    (tmp_path / "cut.safetensors").write_bytes(bytes(data[: len(data) - 10]))
    assert "truncated" in _error(load_training_state, tmp_path / "cut.safetensors", opt)
    data[-5] ^= 0x10
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    assert "corrupt" in _error(load_training_state, tmp_path / "flip.safetensors", opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    assert "zip" in _error(load_training_state, tmp_path / "opt.pt", opt)


def test_a_model_checkpoint_is_not_a_state_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={"normzoo": json.dumps({"format": "normzoo-checkpoint"})})
    assert "model checkpoint" in _error(load_training_state, path, None)
    save_file({"w": torch.zeros(1)}, path)
    assert "without normzoo metadata" in _error(load_training_state, path, None)


def test_failed_write_keeps_the_old_state(tmp_path, monkeypatch):
    import os

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = save_training_state(tmp_path / "s.safetensors", opt, extra={"step": 1})
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(OSError):
        save_training_state(path, opt, extra={"step": 2})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
