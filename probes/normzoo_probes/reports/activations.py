"""``activations``'s report: how far each norm layer's input distribution moves between measurements."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from normzoo.probe_report import ReportFigure
from normzoo_probes.reports.common import PerLayerReport, layer_values


def layer_mean(field: str) -> Callable[[dict[str, Any]], float]:
    """The mean over layers of |field| at one measurement."""
    def mean(record: dict[str, Any]) -> float:
        values = [v for v in layer_values([record], field) if math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan

    return mean


class ActivationsReport(PerLayerReport):
    per_layer = ("in_drift_mean", "in_drift_var", "out_drift_mean", "out_drift_var")

    @property
    def heading(self) -> str:
        return "Activation drift"

    def figures(self) -> list[ReportFigure]:
        return [ReportFigure(
            "activations", self.heading,
            "How far the per-channel mean and variance of each norm layer's input move between measurements, "
            "averaged over layers (Santurkar et al. Fig. 2/8).",
            lambda schemes, plots: plots.over_steps(schemes, "activations", [
                ("drift of the per-channel mean (layer average)", layer_mean("in_drift_mean"), "log", "|Δµ|"),
                ("drift of the per-channel variance (layer average)", layer_mean("in_drift_var"), "log", "|Δσ²|"),
            ]))]
