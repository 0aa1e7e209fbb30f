"""The Hessian probe against exact spectra and traces: quadratics (H known) and a tiny normalized MLP (H formed by
``torch.autograd.functional.hessian`` on the flattened parameters). Float64 throughout.

Power iteration finds the eigenvalue of largest magnitude, signed; the tests compare against exactly that.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from normzoo.errors import SpecError
from normzoo.norms.base import create_norm
from normzoo_probes.hessian import HessianProbe
from test_probes_landscape import D, Quadratic, bn_context, context, identical, snapshot, spd


def largest_magnitude(h: torch.Tensor) -> float:
    eigenvalues = torch.linalg.eigvalsh(h)
    return float(eigenvalues[eigenvalues.abs().argmax()])


def hutchinson_sd(h: torch.Tensor, samples: int) -> float:
    """Standard deviation of the Rademacher estimator's mean: Var(zᵀHz) = 2 Σ_{i≠j} H_ij² for symmetric H."""
    off = h - torch.diag(torch.diag(h))
    return math.sqrt(2 * float((off**2).sum()) / samples)


def test_eigenvalue_and_trace_of_a_quadratic() -> None:
    h = spd([5.0, 2.0, 1.0, 0.5, 0.1])
    values = HessianProbe(iters=100, tol=1e-12, trace_samples=200).measure(context(Quadratic(h, torch.ones(5))))
    assert values["converged"] and values["iterations"] < 100
    assert values["eigenvalue"] == pytest.approx(5.0, rel=1e-10)
    # The estimate is one seeded draw: within 4 standard deviations of tr(H) = 8.6 (a sure, not flaky, bound).
    assert abs(values["trace"] - 8.6) <= 4 * hutchinson_sd(h, 200)
    assert values["trace_stderr"] > 0


def test_trace_is_exact_for_a_diagonal_hessian() -> None:
    """zᵀHz = Σ H_ii z_i² = tr(H) for every Rademacher z when H is diagonal: no sampling error at all."""
    h = torch.diag(torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=D))
    values = HessianProbe(trace_samples=3).measure(context(Quadratic(h, torch.ones(4))))
    assert values["trace"] == pytest.approx(4.5, abs=1e-12)
    assert values["trace_stderr"] == pytest.approx(0.0, abs=1e-12)


def test_reports_the_signed_eigenvalue_of_largest_magnitude() -> None:
    h = spd([-6.0, 3.0, 1.0], seed=2)
    values = HessianProbe(iters=200, tol=1e-12, trace_samples=0).measure(context(Quadratic(h, torch.ones(3))))
    assert values["eigenvalue"] == pytest.approx(-6.0, rel=1e-9)
    assert values["trace"] is None and values["trace_stderr"] is None


def test_unconverged_power_iteration_says_so() -> None:
    values = HessianProbe(iters=2, tol=1e-12).measure(context(Quadratic(spd([1.0, 0.99, 0.5]), torch.ones(3))))
    assert values["iterations"] == 2 and not values["converged"]


def full_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Hessian of the cross-entropy w.r.t. all parameters, flattened in ``model.parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector: torch.Tensor) -> torch.Tensor:
        pieces = vector.split([s.numel() for s in shapes])
        params = {n: piece.view(s) for n, piece, s in zip(names, pieces, shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("norm", ["bn", "l1-bn"])  # torch's kernel, and a custom-autograd norm (double backward)
def test_matches_the_full_hessian_of_a_normalized_mlp_in_train_mode(norm: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), create_norm(norm, 4), nn.Tanh(), nn.Linear(4, 3)).to(D).train()
    x, y = torch.randn(8, 3, dtype=D), torch.randint(0, 3, (8,))
    ctx = context(model, loss_fn=nn.functional.cross_entropy, inputs=x, targets=y)
    values = HessianProbe(iters=500, tol=1e-9, trace_samples=50).measure(ctx)
    h = full_hessian(model, x, y)
    assert values["converged"]
    assert values["eigenvalue"] == pytest.approx(largest_magnitude(h), rel=1e-5)
    assert abs(values["trace"] - float(torch.trace(h))) <= 4 * hutchinson_sd(h, 50)


def test_leaves_the_run_untouched() -> None:
    ctx = bn_context()
    before = snapshot(ctx)
    HessianProbe(iters=3, trace_samples=2).measure(ctx)
    assert identical(before, snapshot(ctx))


def test_seeded_and_reproducible() -> None:
    ctx = bn_context()
    probe = HessianProbe(iters=3, trace_samples=2, seed=5)
    assert probe.measure(ctx) == probe.measure(ctx)


@pytest.mark.parametrize("kwargs", [{"iters": 0}, {"tol": -1.0}, {"tol": math.inf}, {"trace_samples": -1}])
def test_rejects_bad_parameters(kwargs) -> None:
    with pytest.raises(SpecError, match="hessian"):
        HessianProbe(**kwargs)
