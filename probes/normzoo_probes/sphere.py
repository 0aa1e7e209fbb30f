"""The landscape's scale-invariant view: β-smoothness on the sphere of each normalized layer's weight.

For a scale-invariant weight w (:mod:`normzoo_probes.scale_invariance`) the loss depends on u = w/‖w‖ alone, and
∇_w L = ∇_u L / ‖w‖, ∇²_w L = ∇²_u L / ‖w‖² (on the tangent space). The plain β of the landscape probe therefore
scales as 1/‖w‖²: two networks computing the same function, one with weights twice as long, differ 4× in plain β
and in the step size that probes the same change of function. Schemes whose weight norms drift differently are
not compared fairly by it. The sphere view measures the landscape in the coordinates that matter.

Coordinates: each scale-invariant layer's weight is replaced by its direction u_l = w_l/r_l (r_l = ‖w_l‖ at the
measured point, held fixed); every other parameter φ (classifier, biases, norms' γ/β) stays as is. In them the
gradient is g̃ = (r_l g_l for invariant layers, g_φ for the rest), which is tangent to each sphere because
⟨g_l, w_l⟩ = 0. For each step size η of the plain grid (lo..hi × lr):

    u_l(η) = normalize(u_l − η g̃_l)        (a step along the tangent gradient, retracted to the unit sphere)
    φ(η)   = φ − η g_φ
    i.e. w_l(η) = r_l · a_l/‖a_l‖ with a_l = w_l − η r_l² g_l   (the weight norm is kept)

    sphere_beta = max_η ‖g̃(θ) − g̃(θ(η))‖ / (η ‖g̃(θ)‖),   g̃(θ(η))_l = r_l ∇_{w_l} L(θ(η))

Every term is a function of the u_l and φ only, so sphere_beta does not change when a scale-invariant weight is
multiplied by c, while the plain β goes as 1/c² (tests/test_probes_landscape_sphere.py checks both on
f(w) = ½ uᵀAu). In w terms the step moves w_l by about η r_l² g_l — the plain step η g_l times r_l², i.e. the step
at effective learning rate 1 — and sphere_beta ≈ r_l² × the plain β there: the ‖w‖²-rescaled smoothness. With no
scale-invariant layer (``norm=none``) the view is the plain one exactly, and the probe reuses the plain walk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from normzoo.probe import ProbeContext
from normzoo_probes.common import flat_norm_tensor
from normzoo_probes.landscape import GradientWalk, loss_and_gradient
from normzoo_probes.scale_invariance import InvarianceCache, weighted_layers


def invariant_weights(ctx: ProbeContext, cache: InvarianceCache) -> list[tuple[str, nn.Parameter]]:
    """(layer name, weight) of every weighted layer the empirical check finds scale-invariant."""
    layers = weighted_layers(ctx.model)
    return [(name, m.weight) for (name, m), ok in zip(layers, cache.invariant(ctx, layers)) if ok]


class SphereWalk:
    """The walk of the module docstring on top of a :class:`GradientWalk` (its θ, g, RNG replay): radii r_l,
    the rescaled gradient g̃ and its norm, then L and the distance ‖g̃(θ) − g̃(θ(η))‖ at any η (tensors)."""

    def __init__(self, walk: GradientWalk, weights: Sequence[nn.Parameter]) -> None:
        self.walk = walk
        ids = {id(w) for w in weights}
        # r_l per parameter position (None: not on a sphere), as 0-d tensors: no host sync.
        self.radii = [torch.linalg.vector_norm(t) if id(p) in ids else None
                      for p, t in zip(walk.params, walk.theta)]
        self.grad = self.rescaled(walk.grad)
        self.grad_norm = flat_norm_tensor(self.grad)

    def rescaled(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [g if r is None else g * r for g, r in zip(grads, self.radii)]

    @torch.no_grad()
    def _move(self, eta: float) -> None:
        for p, t, g, r in zip(self.walk.params, self.walk.theta, self.walk.grad, self.radii):
            if r is None:
                p.copy_(t).sub_(g, alpha=eta)
            else:
                a = t - (eta * r * r) * g
                p.copy_(a * (r / torch.linalg.vector_norm(a)))

    def evaluate_at(self, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(θ(η)), ‖g̃(θ) − g̃(θ(η))‖), both scalar tensors."""
        self._move(eta)
        self.walk.rewind()
        loss, grad = loss_and_gradient(self.walk.ctx)
        return loss, flat_norm_tensor(torch._foreach_sub(self.grad, self.rescaled(grad)))
