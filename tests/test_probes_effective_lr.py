"""The effective-lr probe: which layers each norm makes scale-invariant (found empirically), and the weight norms,
effective learning rates and angular updates against direct computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from normzoo import build_model
from normzoo.errors import SpecError
from normzoo.probe import ProbeContext
from normzoo_probes.effective_lr import EffectiveLRProbe
from normzoo_probes.scale_invariance import invariance_gaps, weighted_layers

LR, MOMENTUM, DECAY = 0.05, 0.9, 5e-4


def vgg_context(norm: str, optimizer: str = "sgd") -> ProbeContext:
    """A tiny VGG-11 (8 convs and the classifier) one optimizer step into training, in train mode."""
    torch.manual_seed(0)
    model = build_model("vgg11,width=0.0625", norm=norm, num_classes=4, in_chans=3).train()
    opt = (torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ProbeContext(model, F.cross_entropy, x, y, opt, LR, 1, 10)


@pytest.mark.parametrize("norm", ["none", "bn", "lp:inf", "gn", "noisy-bn", "noisy-bn:where=before",
                                  "noisy-bn:bn=false"])
def test_scale_invariant_layers_per_norm(norm: str) -> None:
    """Expected: the convs feeding a normalization and never the classifier; nothing without normalization
    (``none``, and noisy-bn without its BN, whose noise normalizes nothing)."""
    values = EffectiveLRProbe().measure(vgg_context(norm))
    assert len(values["layers"]) == 9 and values["layers"][-1] == "classifier"
    normalized = norm not in ("none", "noisy-bn:bn=false")
    assert values["scale_invariant"] == [normalized] * 8 + [False], values["invariance_gap"]
    gaps = values["invariance_gap"]
    # Far from the 1e-3 line on both sides: eps effects (~1e-6) against an O(1) change of the output.
    assert all(g < 1e-4 for g in gaps[:8]) if normalized else all(g > 0.05 for g in gaps[:8])
    assert gaps[8] > 0.05
    if normalized:  # Euler's identity for a degree-0 homogeneous loss: ⟨∇_w L, w⟩ = 0
        assert all(abs(c) < 1e-3 for c in values["grad_cos"][:8]), values["grad_cos"]


def test_the_noise_must_be_replayed_for_noisy_bn_to_look_invariant() -> None:
    """Without replaying the RNG, each forward draws new noise and the output changes whatever w is: the check
    replays it, so it measures the function of w, not the noise."""
    ctx = vgg_context("noisy-bn")
    layers = weighted_layers(ctx.model)
    with torch.no_grad():
        a, b = ctx.model(ctx.inputs), ctx.model(ctx.inputs)
    assert float((a - b).norm() / a.norm()) > 0.01
    assert max(invariance_gaps(ctx, layers)[:8]) < 1e-4


def test_values_match_direct_computation() -> None:
    ctx = vgg_context("bn")
    twin_model = copy.deepcopy(ctx.model)
    twin_opt = torch.optim.SGD(twin_model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    twin_opt.load_state_dict(ctx.optimizer.state_dict())
    values = EffectiveLRProbe().measure(ctx)

    torch.manual_seed(5)
    F.cross_entropy(twin_model(ctx.inputs), ctx.targets).backward()
    layers = dict(weighted_layers(twin_model))
    before = {name: m.weight.detach().double().clone() for name, m in layers.items()}
    grads = {name: m.weight.grad.double().clone() for name, m in layers.items()}
    twin_opt.step()
    for i, name in enumerate(values["layers"]):
        w, g, new = before[name], grads[name], layers[name].weight.detach().double()
        norm = float(w.norm())
        assert values["weight_norm"][i] == pytest.approx(norm, rel=1e-12)
        assert values["grad_norm"][i] == pytest.approx(float(g.norm()), rel=1e-6)
        assert values["effective_lr"][i] == pytest.approx(LR / norm**2, rel=1e-12)
        assert values["effective_lr_momentum"][i] == pytest.approx(LR / ((1 - MOMENTUM) * norm**2), rel=1e-12)
        angle = math.acos(min(1.0, float((w * new).sum() / (norm * new.norm()))))
        assert values["angular_update"][i] == pytest.approx(angle, rel=1e-4, abs=1e-9)
    assert values["lr"] == LR and "note" not in values


def test_angular_update_is_lr_times_grad_over_norm_for_plain_sgd() -> None:
    """For a scale-invariant w (g ⊥ w), plain SGD's step turns w by atan(η‖g‖/‖w‖): the effective-lr picture."""
    ctx = vgg_context("bn")
    ctx.optimizer = torch.optim.SGD(ctx.model.parameters(), lr=LR)
    values = EffectiveLRProbe().measure(ctx)
    for i in range(8):
        expected = math.atan(LR * values["grad_norm"][i] / values["weight_norm"][i])
        assert values["angular_update"][i] == pytest.approx(expected, rel=1e-3)
    assert values["effective_lr_momentum"] == pytest.approx(values["effective_lr"])  # µ = 0


def test_adam_reports_the_angular_update_but_no_effective_lr() -> None:
    values = EffectiveLRProbe().measure(vgg_context("bn", optimizer="adam"))
    assert "Adam" in values["note"]
    assert all(math.isnan(v) for v in values["effective_lr"] + values["effective_lr_momentum"])
    assert all(0 < a < 1 for a in values["angular_update"])


def test_the_invariance_check_runs_once_per_run() -> None:
    ctx = vgg_context("bn")
    calls = []
    handle = ctx.model.register_forward_hook(lambda *args: calls.append(1))
    probe = EffectiveLRProbe()
    first = probe.measure(ctx)
    n_first = len(calls)
    second = probe.measure(ctx)
    handle.remove()
    assert n_first == 1 + 9 + 1  # the reference, one per layer, then the measurement's own forward
    assert len(calls) - n_first == 1
    assert first == second


def test_rejects_a_bad_tolerance() -> None:
    with pytest.raises(SpecError, match="effective-lr: invariance_tol"):
        EffectiveLRProbe(invariance_tol=-1.0)
