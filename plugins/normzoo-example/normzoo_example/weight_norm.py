"""A probe: the norm of every conv/linear weight (van Laarhoven 2017, "L2 Regularization versus Batch and
Weight Normalization": under BN a layer's weight norm sets its effective learning rate)."""

from __future__ import annotations

import math

from torch import nn

from normzoo.probe import Probe, ProbeContext, Values


class WeightNormProbe(Probe):
    """Records ``layers``, their ``weight_norm`` (ℓ2 of each weight tensor) and the ``total`` over layers.

    It only reads the weights, so it leaves the run untouched without needing ``preserved_state``.
    """

    name = "weight-norm"
    # How `normzoo report` shows it (optional: without it the report gives the probe a generic section).
    report = "normzoo_example.weight_norm_report:WeightNormReport"
    summary = "ℓ2 norm of every conv/linear weight and their total"
    reference = "van Laarhoven 2017, arXiv:1706.05350"

    def __init__(self, **schedule: object) -> None:
        # No parameters of its own: the schedule (every, at, init, log, with their ranges) comes from Probe.
        super().__init__(**schedule)

    def measure(self, ctx: ProbeContext) -> Values:
        layers, norms = [], []
        for name, module in ctx.model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                layers.append(name)
                norms.append(float(module.weight.detach().float().norm()))
        return {"layers": layers, "weight_norm": norms, "total": math.sqrt(sum(n * n for n in norms))}
