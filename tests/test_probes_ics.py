"""The ICS probe (Santurkar et al., Definition 2.1) against closed-form and direct computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normzoo
from normzoo.errors import SpecError
from normzoo.plugins import registry
from normzoo.probe import ProbeContext
from normzoo_probes.ics import ICSProbe

LR, MOMENTUM, DECAY = 0.05, 0.9, 0.01


def context(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
            loss_fn=F.mse_loss) -> ProbeContext:
    return ProbeContext(model, loss_fn, x, y, optimizer, optimizer.param_groups[0]["lr"], 1, 10)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               loss_fn=F.mse_loss) -> None:
    """One real step, so that the optimizer has a momentum buffer when the probe runs."""
    loss_fn(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sgd(model: nn.Module, lr: float = LR) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=DECAY)


def test_two_layer_linear_matches_closed_form():
    torch.manual_seed(0)
    n, d_in, hidden, d_out = 5, 3, 4, 2
    model = nn.Sequential(nn.Linear(d_in, hidden, bias=False), nn.Linear(hidden, d_out, bias=False)).double()
    opt = sgd(model)
    train_step(model, opt, torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64))
    x, t = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    w1, w2 = (m.weight.detach().clone() for m in model)
    buffer1 = opt.state[model[0].weight]["momentum_buffer"].clone()
    params_before = [p.detach().clone() for p in model.parameters()]

    values = ICSProbe().measure(context(model, x, t, opt))

    # L = mean over the n·d_out entries of (W2 W1 x − t)²; R = X W1ᵀ W2ᵀ − T; dL/dY = c R.
    c = 2 / (n * d_out)
    r = x @ w1.T @ w2.T - t
    g1, g2 = c * w2.T @ r.T @ x, c * r.T @ x @ w1.T
    # SGD with weight decay and momentum (dampening 0): buf ← µ·buf + (g + λw); w ← w − η·buf.
    w1_next = w1 - LR * (MOMENTUM * buffer1 + g1 + DECAY * w1)
    r_next = x @ w1_next.T @ w2.T - t
    g2_moved = c * r_next.T @ x @ w1_next.T
    l2 = float((g2 - g2_moved).norm())
    cos = float((g2 * g2_moved).sum() / (g2.norm() * g2_moved.norm()))
    assert values["layers"] == ["0", "1"]
    assert values["l2"] == pytest.approx([0.0, l2], rel=1e-5, abs=1e-12)
    assert values["cos"] == pytest.approx([1.0, cos], rel=1e-6)
    assert values["rel_l2"] == pytest.approx([0.0, l2 / float(g2.norm())], rel=1e-5, abs=1e-12)
    assert values["grad_norm"] == pytest.approx([float(g1.norm()), float(g2.norm())], rel=1e-5)
    # The momentum term matters here: without it (a plain SGD step) the answer would be visibly different.
    w1_plain = w1 - LR * g1
    g2_plain = c * (x @ w1_plain.T @ w2.T - t).T @ x @ w1_plain.T
    assert abs(float((g2 - g2_plain).norm()) - l2) > 1e-3 * l2
    # Everything is back: parameters, the momentum buffer, no gradients.
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"], buffer1)
    assert all(p.grad is None for p in model.parameters())


def test_zero_learning_rate_gives_no_shift_on_vgg():
    torch.manual_seed(0)
    model = normzoo.build_model("vgg11,width=0.125", norm="bn", num_classes=10, in_chans=1)
    x, y = torch.randn(6, 1, 16, 16), torch.randint(0, 10, (6,))
    opt = sgd(model, lr=0.1)
    train_step(model, opt, x, y, F.cross_entropy)
    for group in opt.param_groups:
        group["lr"] = 0.0
    values = ICSProbe().measure(context(model, x, y, opt, F.cross_entropy))
    assert values["layers"] == [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert values["l2"] == [0.0] * len(values["layers"])
    assert values["cos"] == [1.0] * len(values["layers"])
    assert all(g > 0 for g in values["grad_norm"])


def bn_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()


@pytest.mark.parametrize("move", ["upstream", "tracked"])
def test_moved_parameters_match_direct_computation(move):
    """Layer 2's G' with the real optimizer's update applied to everything before it (W1, b1, γ, β), or to the
    tracked layers only (W1, b1), computed directly on a copy of the model and optimizer."""
    torch.manual_seed(1)
    model = bn_mlp()
    opt = sgd(model)
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    train_step(model, opt, torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))

    stepped, stepped_opt = copy.deepcopy((model, opt))  # one memo: the copy's optimizer steps the copy's params
    g = torch.autograd.grad(F.mse_loss(model(x), t), [model[3].weight, model[3].bias])
    train_step(stepped, stepped_opt, x, t)
    shifted = copy.deepcopy(model)
    moved = [0, 1] if move == "upstream" else [0]
    for i in moved:
        shifted[i].load_state_dict(stepped[i].state_dict())
    shifted[1].running_mean.copy_(model[1].running_mean)  # buffers do not matter in train mode; keep them equal
    g_moved = torch.autograd.grad(F.mse_loss(shifted(x), t), [shifted[3].weight, shifted[3].bias])
    flat, flat_moved = torch.cat([a.flatten() for a in g]), torch.cat([a.flatten() for a in g_moved])

    values = ICSProbe(move=move).measure(context(model, x, t, opt))
    assert values["layers"] == ["0", "3"]
    assert values["l2"][1] == pytest.approx(float((flat - flat_moved).norm()), rel=1e-5)
    assert values["cos"][1] == pytest.approx(float(F.cosine_similarity(flat, flat_moved, dim=0)), rel=1e-6)


def test_both_moves_differ_when_norm_parameters_move():
    torch.manual_seed(1)
    model = bn_mlp()
    opt = sgd(model, lr=0.5)
    x, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    ctx = context(model, x, t, opt)
    assert ICSProbe(move="upstream").measure(ctx)["l2"][1] != ICSProbe(move="tracked").measure(ctx)["l2"][1]


class Branches(nn.Module):
    """y = b(a(x)) + c(x): ``c`` runs last but nothing upstream of it moves, so its shift is exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.c(x)


def test_only_upstream_layers_move():
    torch.manual_seed(0)
    model = Branches().double()
    x, t = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    values = ICSProbe().measure(context(model, x, t, sgd(model, lr=0.5)))
    assert values["layers"] == ["a", "b", "c"]
    assert values["l2"][0] == 0.0 and values["l2"][1] > 0 and values["l2"][2] == 0.0


def test_every_forward_sees_the_same_random_draws():
    """With dropout and lr = 0, G' = G exactly only if the probe replays the RNG for each forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x, t = torch.randn(16, 5), torch.randn(16, 2)
    rng = torch.get_rng_state()
    values = ICSProbe().measure(context(model, x, t, sgd(model, lr=0.0)))
    assert values["l2"] == [0.0, 0.0, 0.0]
    assert torch.equal(torch.get_rng_state(), rng)


def test_spec_parameters_and_errors():
    probe = registry("probes").build("ics:every=10,layers=features.4+classifier,move=tracked")
    assert (probe.every, probe.layers, probe.move) == (10, "features.4+classifier", "tracked")
    with pytest.raises(SpecError, match="move"):
        ICSProbe(move="all")
    torch.manual_seed(0)
    model = normzoo.build_model("vgg11,width=0.125", norm="bn", num_classes=10, in_chans=1)
    ctx = context(model, torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,)), sgd(model), F.cross_entropy)
    assert probe.measure(ctx)["layers"] == ["features.4", "classifier"]
    with pytest.raises(SpecError, match="no module named"):
        ICSProbe(layers="features.99").measure(ctx)
