"""Relative loss after one SGD step vs step size (Bjorck et al. 2018, "Understanding Batch Normalization").

Bjorck et al. show that normalized networks tolerate, and gain from, much larger steps: the loss after one step
along −g keeps falling for step sizes where the unnormalized network's loss blows up. The probe records
L(θ − η g) / L(θ) for η log-spaced in [lo, hi] × the current lr, on the batch the step trains on.
"""

from __future__ import annotations

import math

from normzoo.probe import Probe, ProbeContext, Values, preserved_state
from normzoo_probes.common import to_floats
from normzoo_probes.landscape import GradientWalk, check_grid, step_sizes


class StepLossProbe(Probe):
    """L(θ − η g) / L(θ) per step size, and the step size with the lowest loss.

    One forward+backward at θ, then one forward per step size. Ratios are NaN when L(θ) = 0 (nothing to be
    relative to); the best step size is NaN only if every loss is NaN.
    """

    name = "step-loss"
    report = "normzoo_probes.reports.step_loss:StepLossReport"
    summary = "relative loss L(θ − ηg)/L(θ) after one gradient step, per step size"
    reference = "Bjorck et al. 2018, Understanding Batch Normalization, §2"

    def __init__(self, *, steps: int = 9, lo: float = 0.1, hi: float = 10.0, **schedule) -> None:
        super().__init__(**schedule)
        check_grid(self.name, steps, lo, hi)
        self.steps, self.lo, self.hi = steps, lo, hi

    def measure(self, ctx: ProbeContext) -> Values:
        etas = step_sizes(ctx.lr, self.steps, self.lo, self.hi)
        with preserved_state(ctx.model, ctx.optimizer):
            walk = GradientWalk(ctx)
            # Per-step losses stay on the device; one transfer brings them to the host.
            loss, *losses = to_floats([walk.loss, *(walk.evaluate_at(eta, with_gradient=False)[0] for eta in etas)])
        ratios = [new / loss if loss != 0 else math.nan for new in losses]
        finite = [(value, eta) for value, eta in zip(losses, etas) if not math.isnan(value)]
        best_loss, best_eta = min(finite) if finite else (math.nan, math.nan)
        return {"loss": loss, "step_sizes": etas, "losses": losses, "ratios": ratios,
                "best_step_size": best_eta, "best_ratio": best_loss / loss if loss != 0 else math.nan}
