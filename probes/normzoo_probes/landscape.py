"""Loss landscape along the gradient (Santurkar et al. 2018, §3.2 and App. A.2.2).

At θ with gradient g = ∇L(θ) on the step's batch, the probe walks θ − η g for step sizes η log-spaced in
[lo, hi] × the current learning rate and records how much the loss changes (loss variation), how much the
gradient changes (gradient predictiveness) and the largest ‖∇L(θ) − ∇L(θ − η g)‖ / ‖η g‖ (effective
β-smoothness). The helpers here (step-size grid, moving θ along a direction, replaying the RNG) are shared
with :mod:`normzoo_probes.step_loss`, which walks the same line.

``view=sphere`` (or ``both``) adds the scale-invariant view of :mod:`normzoo_probes.sphere`: the same walk in the
coordinates w/‖w‖ of every weight a normalization makes scale-invariant, with gradients rescaled by ‖w‖, so that
``sphere_beta`` does not depend on how long those weights have grown (plain β goes as 1/‖w‖²).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from normzoo.errors import SpecError
from normzoo.probe import Probe, ProbeContext, Values, preserved_state
from normzoo_probes.common import (batch_loss, clone_all, flat_norm, flat_norm_tensor, gradients, rng_rewinder,
                                   seeded_generator, to_floats, trainable)
from normzoo_probes.scale_invariance import InvarianceCache, check_tol


def check_grid(probe: str, steps: int, lo: float, hi: float) -> None:
    """Reject a step-size grid that cannot be log-spaced (raised at construction, i.e. when the spec is parsed)."""
    if steps < 1:
        raise SpecError(f"{probe}: steps must be ≥ 1, got {steps}")
    if not (0 < lo <= hi < math.inf):
        raise SpecError(f"{probe}: need 0 < lo ≤ hi < inf, got lo={lo}, hi={hi}")


def step_sizes(lr: float, steps: int, lo: float, hi: float) -> list[float]:
    """``steps`` step sizes log-spaced from lo·lr to hi·lr (just lo·lr when steps is 1).

    Relative to the current lr because the paper asks what would happen for steps around the one training takes.
    """
    if steps == 1:
        return [lo * lr]
    return [lr * lo * (hi / lo) ** (i / (steps - 1)) for i in range(steps)]


@torch.no_grad()
def move_to(params: Sequence[torch.Tensor], theta: Sequence[torch.Tensor], direction: Sequence[torch.Tensor],
            eta: float) -> None:
    """Set the parameters to θ − η·direction in place (from the saved θ, so no error accumulates), with two fused
    multi-tensor kernels rather than two per parameter."""
    torch._foreach_copy_(list(params), list(theta))
    torch._foreach_sub_(list(params), list(direction), alpha=eta)


def loss_and_gradient(ctx: ProbeContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """L (a detached scalar tensor: no host sync) and ∇L on the probe's batch at the current parameters (one
    forward and one backward)."""
    loss = batch_loss(ctx)
    grads = gradients(loss, trainable(ctx.model))
    return loss.detach(), [g.detach() for g in grads]


def band(values: Sequence[float]) -> tuple[float, float]:
    """(min, max); NaN if any value is NaN (Python's min/max would silently depend on where the NaN sits)."""
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return min(values), max(values)


class GradientWalk:
    """L and g = ∇L at θ on the probe's batch, then L (and ∇L) at θ − η·g for any η.

    Every evaluation starts from the saved θ and the same RNG state (same dropout masks and noisy-bn noise), so
    the differences come from the step alone. The caller restores θ (:func:`preserved_state`). Losses come back
    as scalar tensors, so a loop over step sizes never waits for the device; convert once with
    :func:`~normzoo_probes.common.to_floats`.
    """

    def __init__(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self.rewind = rng_rewinder()
        self.params = trainable(ctx.model)
        self.theta = clone_all(self.params)
        self.loss, self.grad = loss_and_gradient(ctx)

    def evaluate_at(self, eta: float, *, with_gradient: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        move_to(self.params, self.theta, self.grad, eta)
        self.rewind()
        if with_gradient:
            return loss_and_gradient(self.ctx)
        with torch.no_grad():
            return batch_loss(self.ctx).detach(), None


VIEWS = ("plain", "sphere", "both")


class LandscapeProbe(Probe):
    """Loss variation, gradient predictiveness and effective β-smoothness along −∇L.

    One forward+backward at θ and one per step size (k+1 for k step sizes); ``directions`` adds, for
    comparison, forwards along that many random directions scaled to ‖g‖ (k forwards each). Evaluated in the
    model's current mode (train mode during training, so BN uses batch statistics as in the paper); θ,
    buffers, gradients, optimizer state and RNG are restored afterwards.

    ``view=plain`` (default) walks θ − ηg and reports ``beta``; ``view=sphere`` walks on the sphere of each
    scale-invariant weight with gradients rescaled by ‖w‖ (:mod:`normzoo_probes.sphere`) and reports
    ``sphere_beta``, ``sphere_grad_norm``, ``sphere_losses``, ``sphere_grad_distances`` and ``sphere_layers``;
    ``view=both`` does both. The sphere walk costs another k forward+backward passes, plus, at the first
    measurement of a run, one forward per weighted layer to find the scale-invariant ones — so it is opt-in,
    keeping the default probe at k + 1 passes.
    """

    name = "landscape"
    report = "normzoo_probes.reports.landscape:LandscapeReport"
    summary = "loss variation, gradient predictiveness and effective β-smoothness along the gradient"
    reference = "Santurkar et al. 2018, How Does Batch Normalization Help Optimization?, §3.2 and App. A.2.2"

    def __init__(self, *, steps: int = 8, lo: float = 0.5, hi: float = 4.0, directions: int = 0, seed: int = 0,
                 view: Literal["plain", "sphere", "both"] = "plain", invariance_tol: float = 1e-3,
                 **schedule) -> None:
        super().__init__(**schedule)
        check_grid(self.name, steps, lo, hi)
        if directions < 0:
            raise SpecError(f"{self.name}: directions must be ≥ 0, got {directions}")
        if view not in VIEWS:
            raise SpecError(f"{self.name}: view must be one of {', '.join(VIEWS)}, got '{view}'")
        self.steps, self.lo, self.hi, self.directions, self.seed = steps, lo, hi, directions, seed
        self.view = view
        check_tol(self.name, invariance_tol)
        self._invariance = InvarianceCache(invariance_tol)  # the sphere view's scale-invariant layers, once per run

    def measure(self, ctx: ProbeContext) -> Values:
        etas = step_sizes(ctx.lr, self.steps, self.lo, self.hi)
        values: Values = {}
        with preserved_state(ctx.model, ctx.optimizer):
            walk = GradientWalk(ctx)
            if self.view != "sphere":
                values = self._plain(walk, etas)
            if self.view != "plain":
                values |= self._sphere(ctx, walk, etas, values)
            if self.directions:
                values |= self._random_band(ctx, walk.params, walk.theta, flat_norm(walk.grad), etas, walk.rewind)
        return values

    @staticmethod
    def _plain(walk: GradientWalk, etas: list[float]) -> Values:
        losses, distances = [], []
        for eta in etas:
            loss_eta, grad_eta = walk.evaluate_at(eta, with_gradient=True)
            losses.append(loss_eta)
            distances.append(flat_norm_tensor(torch._foreach_sub(walk.grad, grad_eta)))
        # Every per-step value stayed on the device; one transfer brings them all to the host.
        loss, grad_norm, *rest = to_floats([walk.loss, flat_norm_tensor(walk.grad), *losses, *distances])
        return LandscapeProbe._summarise(loss, grad_norm, etas, rest[:len(etas)], rest[len(etas):])

    def _sphere(self, ctx: ProbeContext, walk: GradientWalk, etas: list[float], plain: Values) -> Values:
        # Imported here: sphere builds on this module's GradientWalk.
        from normzoo_probes.sphere import SphereWalk, invariant_weights

        invariant = invariant_weights(ctx, self._invariance)
        names = [name for name, _ in invariant]
        if not invariant and plain:  # no sphere anywhere: the sphere walk is the plain walk
            return {"sphere_beta": plain["beta"], "sphere_grad_norm": plain["grad_norm"],
                    "sphere_losses": plain["losses"], "sphere_grad_distances": plain["grad_distances"],
                    "sphere_layers": names}
        sphere = SphereWalk(walk, [w for _, w in invariant])
        pairs = [sphere.evaluate_at(eta) for eta in etas]
        grad_norm, *rest = to_floats([sphere.grad_norm, *(loss for loss, _ in pairs), *(d for _, d in pairs)])
        losses, distances = rest[:len(etas)], rest[len(etas):]
        ratios = [d / (eta * grad_norm) for d, eta in zip(distances, etas) if eta * grad_norm > 0]
        return {"sphere_beta": _max_or_nan(ratios), "sphere_grad_norm": grad_norm, "sphere_losses": losses,
                "sphere_grad_distances": distances, "sphere_layers": names}

    @staticmethod
    def _summarise(loss: float, grad_norm: float, etas: list[float], losses: list[float],
                   distances: list[float]) -> Values:
        # β is undefined where the step is zero (g = 0 or lr = 0): NaN then, rather than a made-up number.
        ratios = [d / (eta * grad_norm) for d, eta in zip(distances, etas) if eta * grad_norm > 0]
        loss_min, loss_max = band(losses)
        dist_min, dist_max = band(distances)
        return {"loss": loss, "grad_norm": grad_norm, "step_sizes": etas, "losses": losses,
                "grad_distances": distances, "loss_min": loss_min, "loss_max": loss_max,
                "grad_dist_min": dist_min, "grad_dist_max": dist_max, "beta": _max_or_nan(ratios)}

    def _random_band(self, ctx: ProbeContext, params: list[torch.nn.Parameter], theta: list[torch.Tensor],
                     grad_norm: float, etas: list[float], rewind: Callable[[], None]) -> Values:
        """Loss band along random directions of norm ‖g‖: the baseline the gradient direction is compared to."""
        gen = seeded_generator(self.seed, ctx.step, theta[0].device)
        losses = []
        for _ in range(self.directions):
            direction = [torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) for t in theta]
            scale = grad_norm / max(flat_norm(direction), 1e-30)
            for eta in etas:
                move_to(params, theta, direction, eta * scale)
                rewind()
                with torch.no_grad():
                    losses.append(batch_loss(ctx).detach())
        low, high = band(to_floats(losses))
        return {"random_loss_min": low, "random_loss_max": high}


def _max_or_nan(values: list[float]) -> float:
    return max(values) if values else math.nan
