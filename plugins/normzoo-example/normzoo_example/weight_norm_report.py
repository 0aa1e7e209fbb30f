"""How ``normzoo report`` shows the ``weight-norm`` probe: the probe's class names this by import path, so it is
imported only when a report is written. Without it the probe would still get the generic section (its scalars
over steps and their medians)."""

from __future__ import annotations

from normzoo.probe_report import Column, ProbeReport, ReportFigure


class WeightNormReport(ProbeReport):
    # The summary's median total weight norm, shown next to the smoothness ranking.
    columns = (Column("weight_norm_total_median", "median total weight norm"),)

    @property
    def heading(self) -> str:
        return "Weight norms"

    def figures(self) -> list[ReportFigure]:
        # Drawn with the report's helpers (plots): same colours as every other figure, no matplotlib import here.
        return [ReportFigure(
            "weight-norm", self.heading, "The ℓ2 norm of every conv/linear weight at the last probe (weight-norm).",
            lambda schemes, plots: plots.per_layer(schemes, "weight-norm", [("weight_norm", "‖W‖ per layer", "log")],
                                                   last_only=True))]
