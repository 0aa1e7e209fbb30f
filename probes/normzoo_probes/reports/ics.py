"""``ics``'s report: per-layer internal covariate shift, median over training (Santurkar et al. Fig. 3)."""

from __future__ import annotations

from normzoo.probe_report import ReportFigure
from normzoo_probes.reports.common import PerLayerReport


class ICSReport(PerLayerReport):
    per_layer = ("l2", "cos")

    @property
    def heading(self) -> str:
        return "Internal covariate shift"

    def figures(self) -> list[ReportFigure]:
        return [ReportFigure(
            "ics", self.heading,
            "‖G − G′‖₂ and cos(G, G′) per tracked layer, median over training and seeds (Santurkar et al. Fig. 3, "
            "Definition 2.1).",
            lambda schemes, plots: plots.per_layer(schemes, "ics", [("l2", "ℓ2 difference ‖G − G′‖", "log"),
                                                                    ("cos", "cosine angle cos(G, G′)", "linear")]))]
