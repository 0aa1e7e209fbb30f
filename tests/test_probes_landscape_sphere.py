"""The landscape probe's scale-invariant (sphere) view against closed forms on f(w, φ) = ½ uᵀAu + ½ φᵀBφ with
u = w/‖w‖: scale-invariant in w, not in φ. Float64 throughout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normzoo.errors import SpecError
from normzoo_probes.landscape import LandscapeProbe
from test_probes_effective_lr import vgg_context
from test_probes_landscape import D, context, spd


class SphereQuadratic(nn.Linear):
    """½ uᵀAu (+ ½ φᵀBφ when b is given), u = weight/‖weight‖; a Linear so that the probes see a weighted layer."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
                 phi: torch.Tensor | None = None) -> None:
        super().__init__(len(w), 1, bias=False, dtype=D)
        self.register_buffer("a", a)
        with torch.no_grad():
            self.weight.copy_(w.view(1, -1))
        self.b = b
        self.phi = None if phi is None else nn.Parameter(phi.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.weight.view(-1) / torch.linalg.vector_norm(self.weight)
        value = 0.5 * u @ self.a @ u
        return value if self.phi is None else value + 0.5 * self.phi @ self.b @ self.phi


A = spd([3.0, 1.5, 0.5, -0.5], seed=3)
W = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=D)
B = torch.diag(torch.tensor([2.0, 0.5], dtype=D))
PHI = torch.tensor([1.0, -1.0], dtype=D)


def sphere_model(scale: float = 1.0, *, with_phi: bool = True) -> nn.Module:
    """The function with w scaled by ``scale``, wrapped so that its layer has a name ("0") the probes track."""
    return nn.Sequential(SphereQuadratic(A, scale * W, *((B, PHI) if with_phi else ())))


def tangent_gradient(u: torch.Tensor) -> torch.Tensor:
    """‖w‖·∇_w(½ uᵀAu) = (I − uuᵀ)Au: the gradient on the unit sphere."""
    au = A @ u
    return au - (u @ au) * u


def closed_form_sphere_beta(etas: list[float]) -> float:
    u = W / W.norm()
    g = torch.cat([tangent_gradient(u), B @ PHI])
    ratios = []
    for eta in etas:
        step = u - eta * tangent_gradient(u)
        u_eta, phi_eta = step / step.norm(), PHI - eta * B @ PHI
        g_eta = torch.cat([tangent_gradient(u_eta), B @ phi_eta])
        ratios.append(float((g - g_eta).norm() / (eta * g.norm())))
    return max(ratios)


@pytest.mark.parametrize("c", [1.0, 3.0, 0.25])
def test_sphere_beta_matches_the_closed_form_and_ignores_the_weight_norm(c: float) -> None:
    values = LandscapeProbe(steps=5, view="both").measure(context(sphere_model(c), lr=0.1))
    assert values["sphere_layers"] == ["0"]  # w is on a sphere; φ, not in a weighted layer's weight, is not
    assert values["sphere_beta"] == pytest.approx(closed_form_sphere_beta(values["step_sizes"]), rel=1e-10)
    assert values["sphere_grad_norm"] == pytest.approx(
        float(torch.cat([tangent_gradient(W / W.norm()), B @ PHI]).norm()), rel=1e-12)


def test_plain_beta_scales_as_one_over_c_squared_and_sphere_beta_does_not() -> None:
    """For a purely scale-invariant f, the plain walk at (c·w, lr) is the walk at (w, lr/c²) seen through
    ∇L(cw) = ∇L(w)/c: β(cw, lr) = β(w, lr/c²)/c² exactly, while sphere_beta(cw, lr) = sphere_beta(w, lr)."""
    probe = LandscapeProbe(steps=4, view="both")
    c = 3.0
    base = probe.measure(context(sphere_model(with_phi=False), lr=0.1))
    scaled = probe.measure(context(sphere_model(c, with_phi=False), lr=0.1))
    matched = probe.measure(context(sphere_model(with_phi=False), lr=0.1 / c**2))
    assert scaled["beta"] == pytest.approx(matched["beta"] / c**2, rel=1e-10)
    assert scaled["beta"] != pytest.approx(base["beta"], rel=1e-2)  # plain β really does move with ‖w‖
    assert scaled["sphere_beta"] == pytest.approx(base["sphere_beta"], rel=1e-10)
    assert scaled["sphere_losses"] == pytest.approx(base["sphere_losses"], rel=1e-12)


def test_both_keeps_the_plain_record_unchanged() -> None:
    ctx = vgg_context("bn")
    plain = LandscapeProbe(steps=3).measure(ctx)
    both = LandscapeProbe(steps=3, view="both").measure(ctx)
    assert {k: both[k] for k in plain} == plain
    assert both["sphere_layers"] == [f"features.{i}" for i in (0, 4, 8, 11, 15, 18, 22, 25)]
    assert both["sphere_beta"] > 0 and both["sphere_beta"] != both["beta"]
    sphere = LandscapeProbe(steps=3, view="sphere").measure(ctx)
    assert "beta" not in sphere and sphere["sphere_beta"] == pytest.approx(both["sphere_beta"], rel=1e-6)


def test_without_scale_invariant_layers_the_sphere_view_is_the_plain_one() -> None:
    ctx = vgg_context("none")
    both = LandscapeProbe(steps=3, view="both").measure(ctx)
    assert both["sphere_layers"] == []
    assert (both["sphere_beta"], both["sphere_losses"]) == (both["beta"], both["losses"])
    sphere = LandscapeProbe(steps=3, view="sphere").measure(ctx)
    assert sphere["sphere_beta"] == pytest.approx(both["beta"], rel=1e-6)


def test_rejects_an_unknown_view() -> None:
    with pytest.raises(SpecError, match="landscape: view must be one of plain, sphere, both"):
        LandscapeProbe(view="round")
