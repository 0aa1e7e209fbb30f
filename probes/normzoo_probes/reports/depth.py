"""``grad-norms``' and ``depth-scaling``'s reports: per-layer values through depth at the last probe (Bjorck et
al. 2018)."""

from __future__ import annotations

from normzoo.probe_report import ProbeReport, ReportFigure


class GradNormsReport(ProbeReport):
    @property
    def heading(self) -> str:
        return "Gradients through depth"

    def figures(self) -> list[ReportFigure]:
        return [ReportFigure(
            "grad-norms", self.heading, "Per-layer gradient norm at the last probe (Bjorck et al. 2018).",
            lambda schemes, plots: plots.per_layer(schemes, "grad-norms",
                                                   [("grad_norm", "gradient norm per layer", "log")], last_only=True),
            per_setting=False)]


class DepthScalingReport(ProbeReport):
    @property
    def heading(self) -> str:
        return "Scale through depth"

    def figures(self) -> list[ReportFigure]:
        return [ReportFigure(
            "depth-scaling", self.heading,
            "Activation RMS and activation-gradient norm per layer at the last probe (Bjorck et al. 2018: without "
            "normalization they grow or shrink geometrically with depth).",
            lambda schemes, plots: plots.per_layer(schemes, "depth-scaling",
                                                   [("act_rms", "activation RMS", "log"),
                                                    ("act_grad_norm", "activation-gradient norm", "log")],
                                                   last_only=True),
            per_setting=False)]
