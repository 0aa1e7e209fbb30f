"""``effective-lr``'s report: per-layer weight norm, effective learning rate lr/‖w‖² and angular update through
depth (van Laarhoven 2017), with their medians over layers and training in the summary."""

from __future__ import annotations

from normzoo.probe_report import ReportFigure
from normzoo_probes.reports.common import PerLayerReport


class EffectiveLRReport(PerLayerReport):
    per_layer = ("weight_norm", "effective_lr", "angular_update")

    @property
    def heading(self) -> str:
        return "Effective learning rate"

    def figures(self) -> list[ReportFigure]:
        return [ReportFigure(
            "effective-lr", self.heading,
            "Per tracked layer, median over training and seeds: the weight norm ‖w‖, the effective learning rate "
            "lr/‖w‖² (what a scale-invariant layer's direction sees) and the angle the weight turns per step "
            "(van Laarhoven 2017).",
            lambda schemes, plots: plots.per_layer(schemes, "effective-lr", [
                ("weight_norm", "weight norm ‖w‖", "log"), ("effective_lr", "effective learning rate lr/‖w‖²", "log"),
                ("angular_update", "angular update per step (rad)", "log")]))]
