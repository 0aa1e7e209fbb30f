"""normzoo's SGD and Adam against torch.optim's: the same updates bit for bit, the same state.

That they import no ``torch._dynamo`` is checked in a fresh process by ``tests/test_startup.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normzoo.optim import SGD, Adam


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, first: int = 0) -> list[float]:
    losses = []
    for step in range(first, first + steps):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 3, 8, 8, generator=generator), torch.randint(0, 5, (6,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _groups(model: nn.Module, split: bool) -> object:
    if not split:
        return model.parameters()
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim > 1]}, {"params": [p for p in params if p.ndim <= 1],
                                                            "weight_decay": 0.0}]


SGD_CASES = [dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9, weight_decay=5e-4),
             dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
             dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=1e-2)]
ADAM_CASES = [dict(lr=1e-3), dict(lr=3e-3, weight_decay=1e-2), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)]
CASES = [(SGD, torch.optim.SGD, c) for c in SGD_CASES] + [(Adam, torch.optim.Adam, c) for c in ADAM_CASES]


@pytest.mark.parametrize("ours, theirs, options", CASES)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_updates_are_torchs_bit_for_bit(ours, theirs, options, foreach, split):
    reference, model = _model(), _model()
    expected = _train(reference, theirs(_groups(reference, split), foreach=foreach, **options), 5)
    optimizer = ours(_groups(model, split), **options)
    assert _train(model, optimizer, 5) == expected
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("ours, theirs, options", [CASES[3], CASES[-2]])
def test_state_dicts_move_between_them(ours, theirs, options):
    """A checkpoint of either resumes in the other, and the run continues exactly as with torch.optim alone."""
    reference, model = _model(), _model()
    torch_optimizer = theirs(reference.parameters(), **options)
    _train(reference, torch_optimizer, 3)
    model.load_state_dict(reference.state_dict())
    optimizer = ours(model.parameters(), **options)
    optimizer.load_state_dict(copy.deepcopy(torch_optimizer.state_dict()))  # loading keeps the tensors
    assert _train(model, optimizer, 3, first=3) == _train(reference, torch_optimizer, 3, first=3)
    back = theirs(reference.parameters(), **options)
    back.load_state_dict(optimizer.state_dict())
    mine, torchs = optimizer.state_dict(), torch_optimizer.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["state"].keys() == torchs["state"].keys()
    for index, entry in mine["state"].items():
        assert entry.keys() == torchs["state"][index].keys()
        assert all(torch.equal(value, torchs["state"][index][name]) for name, value in entry.items())


def test_is_a_torch_optimizer_with_its_hooks_and_closure():
    model = _model()
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert isinstance(optimizer, torch.optim.SGD) and isinstance(optimizer, torch.optim.Optimizer)
    calls = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(opt))
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert calls == [optimizer] and torch.is_tensor(loss)
    frozen = nn.Linear(2, 2)  # parameters without gradients are left alone, as torch.optim leaves them
    before = frozen.weight.clone()
    SGD(frozen.parameters(), lr=1.0, momentum=0.9).step()
    assert torch.equal(frozen.weight, before)


@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1, maximize=True), lambda p: Adam(p, amsgrad=True),
                                  lambda p: Adam(p, decoupled_weight_decay=True, weight_decay=0.1)])
def test_options_it_does_not_implement_are_refused(make):
    model = nn.Linear(2, 1)
    optimizer = make(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(NotImplementedError, match="torch.optim"):
        optimizer.step()
