"""The landscape and step-loss probes against closed forms on a quadratic, and their state hygiene.

On L(θ) = ½ θᵀHθ the gradient is g = Hθ and ∇L(θ) − ∇L(θ − ηg) = ηHg, so every quantity the probes report has
a closed form. Everything runs in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normzoo.errors import SpecError
from normzoo.norms.base import create_norm
from normzoo.probe import ProbeContext
from normzoo_probes.landscape import LandscapeProbe, step_sizes
from normzoo_probes.step_loss import StepLossProbe

D = torch.float64


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀHθ, whatever the input; the loss_fn passes it through."""

    def __init__(self, hessian: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("hessian", hessian.to(D))
        self.theta = nn.Parameter(theta.to(D).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.theta @ self.hessian @ self.theta

    def loss_at(self, theta: torch.Tensor) -> float:
        return float(0.5 * theta @ self.hessian @ theta)


def context(model: nn.Module, *, lr: float = 0.1, loss_fn=lambda out, y: out, inputs: torch.Tensor | None = None,
            targets: torch.Tensor | None = None, step: int = 3) -> ProbeContext:
    """A mid-training context at the model's current θ: SGD with momentum state and stale grads, as the runner
    leaves them (the step that created the state is undone, so closed forms can use the θ the test chose)."""
    inputs = torch.zeros(4, 1, dtype=D) if inputs is None else inputs
    targets = torch.zeros(4, dtype=D) if targets is None else targets
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    theta = [p.detach().clone() for p in model.parameters()]
    loss_fn(model(inputs), targets).sum().backward()
    optimizer.step()
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta):
            p.copy_(t)
    return ProbeContext(model, loss_fn, inputs, targets, optimizer, lr, step, total_steps=100)


def spd(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """Q diag(λ) Qᵀ with a random orthogonal Q: a symmetric matrix with the given spectrum."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=D))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=D)) @ q.T


def test_step_sizes_are_log_spaced_multiples_of_lr() -> None:
    etas = step_sizes(0.1, 4, 0.5, 4.0)
    assert etas == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert step_sizes(0.1, 1, 0.5, 4.0) == pytest.approx([0.05])


def test_landscape_matches_closed_form_on_quadratic() -> None:
    h = spd([4.0, 2.0, 1.0, 0.5, 0.25])
    theta = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=D)
    model = Quadratic(h, theta)
    values = LandscapeProbe(steps=5, lo=0.5, hi=4.0).measure(context(model, lr=0.1))

    g = h @ theta
    etas = [0.1 * 0.5 * 8 ** (i / 4) for i in range(5)]
    losses = [model.loss_at(theta - eta * g) for eta in etas]
    hg = float(torch.linalg.norm(h @ g))
    assert values["step_sizes"] == pytest.approx(etas, rel=1e-12)
    assert values["loss"] == pytest.approx(model.loss_at(theta), rel=1e-6)
    assert values["grad_norm"] == pytest.approx(float(torch.linalg.norm(g)), rel=1e-12)
    assert values["losses"] == pytest.approx(losses, rel=1e-6)
    assert (values["loss_min"], values["loss_max"]) == pytest.approx((min(losses), max(losses)), rel=1e-6)
    # ‖∇L(θ) − ∇L(θ − ηg)‖ = η‖Hg‖, so the ratio to ‖ηg‖ is ‖Hg‖/‖g‖ at every η ...
    assert values["grad_distances"] == pytest.approx([eta * hg for eta in etas], rel=1e-10)
    assert (values["grad_dist_min"], values["grad_dist_max"]) == pytest.approx((etas[0] * hg, etas[-1] * hg))
    beta = hg / float(torch.linalg.norm(g))
    assert values["beta"] == pytest.approx(beta, rel=1e-10)
    # ... which lies between the Rayleigh quotient gᵀHg/gᵀg and λ_max (Cauchy–Schwarz), equal to neither here.
    rayleigh = float(g @ h @ g / (g @ g))
    assert rayleigh < beta < 4.0


def test_landscape_beta_is_the_eigenvalue_along_an_eigenvector() -> None:
    """When g is an eigenvector of H (θ is one), β is its eigenvalue, i.e. also gᵀHg/gᵀg."""
    h = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=D))
    values = LandscapeProbe(steps=3).measure(context(Quadratic(h, torch.tensor([0.0, 2.0, 0.0]))))
    assert values["beta"] == pytest.approx(1.0, rel=1e-12)


def test_landscape_random_directions_are_worse_than_the_gradient_on_isotropic_quadratic() -> None:
    """For H = cI, L(θ − ηd) = ½c(‖θ‖² − 2η θ·d + η²‖d‖²): among directions with ‖d‖ = ‖g‖ the gradient
    (d ∥ θ) gives the lowest loss at each η and d ∥ −θ the highest, which bounds the random band."""
    c, theta = 2.0, torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=D)
    model = Quadratic(c * torch.eye(4, dtype=D), theta)
    probe = LandscapeProbe(steps=4, directions=3, seed=7)
    values = probe.measure(context(model))
    radius, g_norm = float(torch.linalg.norm(theta)), c * float(torch.linalg.norm(theta))
    worst = 0.5 * c * (radius + values["step_sizes"][-1] * g_norm) ** 2
    assert values["loss_min"] <= values["random_loss_min"] <= values["random_loss_max"] <= worst * (1 + 1e-6)
    assert probe.measure(context(model)) == values  # seeded: the same directions again


def test_step_loss_matches_closed_form_on_quadratic() -> None:
    h = spd([5.0, 1.0, 0.2], seed=1)
    theta = torch.tensor([1.0, 2.0, -1.0], dtype=D)
    model = Quadratic(h, theta)
    values = StepLossProbe(steps=9).measure(context(model, lr=0.1))

    g, base = h @ theta, model.loss_at(theta)
    etas = [0.1 * 0.1 * 100 ** (i / 8) for i in range(9)]
    ratios = [model.loss_at(theta - eta * g) / base for eta in etas]
    best = min(range(9), key=ratios.__getitem__)
    assert values["step_sizes"] == pytest.approx(etas, rel=1e-12)
    assert values["ratios"] == pytest.approx(ratios, rel=1e-6)
    assert values["best_step_size"] == pytest.approx(etas[best], rel=1e-12)
    assert values["best_ratio"] == pytest.approx(ratios[best], rel=1e-6)


def snapshot(ctx: ProbeContext) -> dict[str, object]:
    """Everything a probe must leave bit-identical."""
    m, opt = ctx.model, ctx.optimizer
    return {"params": [p.clone() for p in m.parameters()], "grads": [p.grad.clone() for p in m.parameters()],
            "buffers": [b.clone() for b in m.buffers()], "modes": [x.training for x in m.modules()],
            "rng": [torch.get_rng_state()],
            "optimizer": [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]}


def identical(a: dict[str, object], b: dict[str, object]) -> bool:
    return all(torch.equal(x, y) if torch.is_tensor(x) else x == y
               for key in a for x, y in zip(a[key], b[key], strict=True))


def bn_context() -> ProbeContext:
    """A float64 MLP with normzoo's BN (train mode) and dropout, one momentum step into training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), create_norm("bn", 5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 2))
    return context(model.to(D).train(), loss_fn=nn.functional.cross_entropy, inputs=torch.randn(8, 3, dtype=D),
                   targets=torch.randint(0, 2, (8,)))


@pytest.mark.parametrize("probe", [LandscapeProbe(steps=3, directions=2), StepLossProbe(steps=3)],
                         ids=["landscape", "step-loss"])
def test_probes_leave_bn_running_stats_and_the_run_untouched(probe) -> None:
    ctx = bn_context()
    before = snapshot(ctx)
    probe.measure(ctx)
    assert identical(before, snapshot(ctx))
    ctx.model(ctx.inputs)  # the check would be vacuous if a train-mode forward left the running statistics alone
    assert not identical({"buffers": before["buffers"]}, {"buffers": snapshot(ctx)["buffers"]})


def test_landscape_sees_the_same_dropout_mask_at_every_step_size() -> None:
    """A vanishing step must give back L(θ): the line is one function of η, not resampled noise."""
    values = LandscapeProbe(steps=2, lo=1e-9, hi=2e-9).measure(bn_context())
    assert values["losses"] == pytest.approx([values["loss"]] * 2, rel=1e-6)
    assert values["grad_dist_max"] < 1e-6 * values["grad_norm"]


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"lo": 0.0}, {"lo": 2.0, "hi": 1.0}, {"hi": math.inf},
                                    {"directions": -1}, {"every": -1}])
def test_landscape_rejects_bad_parameters(kwargs) -> None:
    with pytest.raises(SpecError, match="landscape"):
        LandscapeProbe(**kwargs)


def test_step_loss_rejects_bad_parameters() -> None:
    with pytest.raises(SpecError, match="step-loss: steps"):
        StepLossProbe(steps=0)
