"""The activation-statistics probe (Santurkar et al. Fig. 2/8) and the depth probes (Bjorck et al.) against
direct computations with hooks and autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normzoo
from normzoo.norms.base import create_norm
from normzoo.probe import ProbeContext
from normzoo_probes.activations import ActivationsProbe
from normzoo.placement import is_norm
from normzoo_probes.depth import DepthScalingProbe, GradNormsProbe


def vgg(norm: str = "bn") -> nn.Module:
    torch.manual_seed(0)
    return normzoo.build_model("vgg11,width=0.125", norm=norm, num_classes=10, in_chans=1).double()


def context(model: nn.Module, step: int = 0, seed: int = 1, loss_fn=F.cross_entropy) -> ProbeContext:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=gen)
    return ProbeContext(model, loss_fn, x, y, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, step, 10)


def direct_activations(model: nn.Module, x: torch.Tensor, kinds) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of each module selected by ``kinds``, from a plain forward with hooks."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str, args: tuple, output: torch.Tensor) -> None:
        seen.setdefault(name, (args[0].detach().clone(), output.detach().clone()))

    handles = [m.register_forward_hook(lambda m, a, o, n=n: keep(n, a, o))
               for n, m in model.named_modules() if n and kinds(m)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("norm, kinds", [("bn", is_norm), ("none", lambda m: isinstance(m, (nn.Conv2d, nn.Linear)))])
def test_statistics_match_direct_computation(norm, kinds):
    model = vgg(norm)
    ctx = context(model)
    buffers = [b.clone() for b in model.buffers()]
    values = ActivationsProbe().measure(ctx)
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))  # the train-mode forward is undone
    expected = direct_activations(model, ctx.inputs, kinds)
    assert values["layers"] == list(expected) and len(expected) >= 8
    for side, k in (("in", 0), ("out", 1)):
        assert values[f"{side}_mean"] == pytest.approx([float(v[k].mean()) for v in expected.values()], abs=1e-12)
        assert values[f"{side}_var"] == pytest.approx([float(v[k].var(correction=0)) for v in expected.values()],
                                                      rel=1e-10)
    assert "drift_from" not in values  # nothing to drift from yet
    if norm == "bn":  # a BN output is standardized per channel in train mode
        assert values["out_mean"] == pytest.approx([0.0] * len(expected), abs=1e-9)
        assert values["out_var"] == pytest.approx([1.0] * len(expected), abs=1e-3)


def test_drift_is_zero_without_change_and_measured_per_channel_after_one():
    model = vgg()
    probe = ActivationsProbe()
    probe.measure(context(model, step=0))
    again = probe.measure(context(model, step=5))
    assert again["drift_from"] == 0
    for key in ("in_drift_mean", "in_drift_var", "out_drift_mean", "out_drift_var"):
        assert again[key] == [0.0] * len(again["layers"])

    before = direct_activations(model, context(model).inputs, is_norm)
    with torch.no_grad():
        model.features[0].weight.mul_(1.5).add_(0.1)
    after = direct_activations(model, context(model).inputs, is_norm)
    moved = probe.measure(context(model, step=9))
    assert moved["drift_from"] == 5
    for i, name in enumerate(moved["layers"]):
        old, new = (acts[name][0].movedim(1, 0).flatten(1) for acts in (before, after))
        assert moved["in_drift_mean"][i] == pytest.approx(float((new.mean(1) - old.mean(1)).abs().mean()), rel=1e-9)
        assert moved["in_drift_var"][i] == pytest.approx(
            float((new.var(1, correction=0) - old.var(1, correction=0)).abs().mean()), rel=1e-9)
    assert moved["in_drift_mean"][0] > 0 and moved["in_drift_var"][0] > 0


def test_linear_norm_layers_and_channel_count_change():
    """(N, C) activations through a norm made from a spec; a layer whose width changed drifts by NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), create_norm("bn", 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    ctx = ProbeContext(model, F.mse_loss, x, torch.zeros(7, 2, dtype=torch.float64),
                       torch.optim.SGD(model.parameters(), lr=0.1), 0.1, 0, 10)
    probe = ActivationsProbe()
    values = probe.measure(ctx)
    h = model[0](x).detach()
    assert values["layers"] == ["1"]
    assert values["in_mean"] == pytest.approx([float(h.mean())]) and values["in_var"] == pytest.approx(
        [float(h.var(correction=0))])
    model[0], model[1] = nn.Linear(4, 5).double(), create_norm("bn", 5).double()
    model[3] = nn.Linear(5, 2).double()
    assert all(math.isnan(v) for v in probe.measure(ctx)["in_drift_mean"])


def test_grad_norms_match_autograd():
    model = vgg()
    ctx = context(model)
    values = GradNormsProbe().measure(ctx)
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(ctx.inputs), ctx.targets), params)
    grad_of = {id(p): g for p, g in zip(params, grads)}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert values["layers"] == [n for n, _ in layers]

    def norm(tensors) -> float:
        return float(torch.sqrt(sum((t.detach() ** 2).sum() for t in tensors)))

    assert values["grad_norm"] == pytest.approx([norm([grad_of[id(p)] for p in m.parameters()])
                                                 for _, m in layers], rel=1e-6)
    assert values["param_norm"] == pytest.approx([norm(list(m.parameters())) for _, m in layers], rel=1e-12)
    assert values["total_grad_norm"] == pytest.approx(norm(grads), rel=1e-6)
    assert all(p.grad is None for p in params)


def test_depth_scaling_matches_autograd_despite_inplace_relu():
    """Activations and output gradients of each Linear; the in-place ReLUs would corrupt both if the probe kept
    the tensor the rest of the network modifies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.ReLU(inplace=True),
                          nn.Linear(6, 3)).double()
    x, t = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    ctx = ProbeContext(model, F.mse_loss, x, t, torch.optim.SGD(model.parameters(), lr=0.1), 0.1, 0, 10)
    values = DepthScalingProbe().measure(ctx)

    a1 = model[0](x)
    a2 = model[2](torch.relu(a1))
    a3 = model[4](torch.relu(a2))
    grads = torch.autograd.grad(F.mse_loss(a3, t), [a1, a2, a3])
    acts = [a.detach() for a in (a1, a2, a3)]
    assert values["layers"] == ["0", "2", "4"]
    assert values["act_rms"] == pytest.approx([float(a.square().mean().sqrt()) for a in acts], rel=1e-12)
    assert values["act_mean_abs"] == pytest.approx([float(a.abs().mean()) for a in acts], rel=1e-12)
    assert values["act_grad_norm"] == pytest.approx([float(g.norm()) for g in grads], rel=1e-6)
    assert values["loss"] == pytest.approx(float(F.mse_loss(acts[2], t)), rel=1e-6)


def test_depth_scaling_on_vgg_and_hooks_removed():
    model = vgg("none")
    values = DepthScalingProbe().measure(context(model))
    assert len(values["layers"]) == 9 and all(v > 0 for v in values["act_grad_norm"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
