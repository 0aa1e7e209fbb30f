"""Effective learning rate and angular update of the weights that feed a normalization.

For a scale-invariant weight w (:mod:`normzoo_probes.scale_invariance`) only the direction w/‖w‖ matters, and
a plain SGD step η·∇L turns it by about η‖∇L‖/‖w‖ = (η/‖w‖²)·‖∇_u L‖ with ∇_u L = ‖w‖∇L the gradient with respect
to the direction: the learning rate that governs the function is η/‖w‖², not η (van Laarhoven 2017; Hoffer et al.
2018, "Norm matters"; Lyu, Li & Arora 2022). Schemes whose weight norms drift differently therefore train at
different effective learning rates from the same η — one candidate explanation of why normalization "allows
larger learning rates" (Bjorck et al. 2018) that this probe makes measurable.

Per weighted layer (conv/linear with a trainable weight), in forward-registration order:

- ``weight_norm`` ‖w‖ and ``grad_norm`` ‖∇_w L‖ on the step's batch; ``grad_cos`` = cos(∇_w L, w), ≈ 0 for a
  scale-invariant layer (⟨∇L(w), w⟩ = 0);
- ``effective_lr`` = η/‖w‖² (η the current learning rate);
- ``effective_lr_momentum`` = η(1 − τ)/((1 − µ)‖w‖²) for SGD with momentum µ (dampening τ): with a steady
  gradient the momentum buffer settles at (1 − τ)g/(1 − µ), so each step moves w by that much — µ = 0.9 makes
  the effective rate 10× η/‖w‖² (also for Nesterov, whose step g + µb settles at g/(1 − µ));
- ``angular_update``: the angle (radians) between w and the w the real optimizer step on this batch produces
  (momentum, weight decay, the current lr), 2·asin(‖u − u'‖/2) with u = w/‖w‖, u' = w'/‖w'‖ — stable for tiny
  angles, where acos of a dot product is not. Measured for every optimizer; weight decay shrinks ‖w‖ but does not
  turn w;
- ``scale_invariant`` and ``invariance_gap`` from the empirical check (cached per run).

For optimizers other than SGD (Adam...) the effective-lr fields are NaN and ``note`` says why: Adam's step does
not scale with the gradient, so it turns a scale-invariant w by about η·‖m̂/√v̂‖/‖w‖ — its effective learning rate
goes as η/‖w‖, not η/‖w‖²; the measured ``angular_update`` remains comparable.

Cost: one forward+backward and one optimizer step (undone by :func:`preserved_state`), plus, at the first
measurement only, one forward per layer for the scale-invariance check.
"""

from __future__ import annotations

import math

import torch

from normzoo.probe import Probe, ProbeContext, Values, preserved_state
from normzoo_probes.common import batch_loss, clone_all, to_floats
from normzoo_probes.scale_invariance import InvarianceCache, check_tol, weighted_layers


def momentum_factor(optimizer: torch.optim.Optimizer) -> tuple[float, str | None]:
    """(1 − τ)/(1 − µ) of SGD's first param group, or (NaN, why) for an optimizer where η/‖w‖² is not the rate."""
    if not isinstance(optimizer, torch.optim.SGD):
        return math.nan, (f"effective_lr is defined for SGD; {type(optimizer).__name__}'s step does not scale with "
                          "the gradient (angular update ~ lr/‖w‖), see angular_update")
    group = optimizer.param_groups[0]
    mu = float(group.get("momentum", 0.0))
    if mu >= 1:
        return math.nan, f"momentum {mu} ≥ 1 has no steady state"
    return (1 - float(group.get("dampening", 0.0)) if mu else 1.0) / (1 - mu), None


class EffectiveLRProbe(Probe):
    """Per layer: ``layers``, ``weight_norm``, ``grad_norm``, ``grad_cos``, ``effective_lr``,
    ``effective_lr_momentum``, ``angular_update``, ``scale_invariant``, ``invariance_gap`` (see the module
    docstring); ``lr``; ``note`` when the effective rates are NaN. ``invariance_tol`` is the largest relative
    output change under w → 2w that still counts as scale-invariant."""

    name = "effective-lr"
    report = "normzoo_probes.reports.effective_lr:EffectiveLRReport"
    summary = "per layer ‖w‖, effective learning rate lr/‖w‖², angular update per step, and which are scale-invariant"
    reference = ("van Laarhoven 2017, L2 Regularization versus Batch and Weight Normalization; Lyu, Li & Arora 2022, "
                 "Understanding the Generalization Benefit of Normalization Layers (NeurIPS)")

    def __init__(self, *, layers: str = "weighted", invariance_tol: float = 1e-3, **schedule) -> None:
        super().__init__(**schedule)
        check_tol(self.name, invariance_tol)
        self.layers = layers
        self._invariance = InvarianceCache(invariance_tol)

    def measure(self, ctx: ProbeContext) -> Values:
        tracked = weighted_layers(ctx.model, self.layers)
        gaps = self._invariance.gaps(ctx, tracked)
        weights = [m.weight for _, m in tracked]
        with preserved_state(ctx.model, ctx.optimizer), torch.enable_grad():
            for p in ctx.model.parameters():
                p.grad = None
            batch_loss(ctx).backward()
            before = clone_all(weights)
            # Per layer ‖w‖, ‖g‖, ⟨g, w⟩ (before the step: an optimizer may reuse .grad), then ‖u − u'‖, all kept
            # on the device and brought to the host once.
            rows = []
            for w, new in zip(before, weights):
                g = torch.zeros_like(w) if new.grad is None else new.grad
                w, g = w.double(), g.double()
                rows.append([torch.linalg.vector_norm(w), torch.linalg.vector_norm(g), (g * w).sum()])
            ctx.optimizer.step()
            for row, w, new in zip(rows, before, weights):
                u, u_new = w.double() / row[0], new.detach().double()
                row.append(torch.linalg.vector_norm(u - u_new / torch.linalg.vector_norm(u_new)))
            flat = to_floats([value for row in rows for value in row])
        factor, note = momentum_factor(ctx.optimizer)
        rate = math.nan if math.isnan(factor) else 1.0
        norms, grad_norms, dots, chords = (flat[i::4] for i in range(4))
        values: Values = {
            "layers": [name for name, _ in tracked], "lr": ctx.lr, "weight_norm": norms, "grad_norm": grad_norms,
            "grad_cos": [d / (n * g) if n * g > 0 else 0.0 for d, n, g in zip(dots, norms, grad_norms)],
            "effective_lr": [rate * ctx.lr / n**2 if n > 0 else math.nan for n in norms],
            "effective_lr_momentum": [factor * ctx.lr / n**2 if n > 0 else math.nan for n in norms],
            "angular_update": [2 * math.asin(min(c / 2, 1.0)) for c in chords],
            "scale_invariant": self._invariance.invariant(ctx, tracked), "invariance_gap": gaps}
        if note:
            values["note"] = note
        return values
