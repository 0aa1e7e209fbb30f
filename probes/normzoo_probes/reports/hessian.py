"""``hessian``'s report: the top eigenvalue as a ranking column, eigenvalue and trace over training."""

from __future__ import annotations

from normzoo.probe_report import Column, ProbeReport, ReportFigure


class HessianReport(ProbeReport):
    columns = (Column("hessian_eigenvalue_median", "Hessian λ_max"),)

    @property
    def heading(self) -> str:
        return "Hessian"

    def figures(self) -> list[ReportFigure]:
        return [ReportFigure(
            "hessian", self.heading, "Top Hessian eigenvalue (power iteration) and trace (Hutchinson) over training.",
            lambda schemes, plots: plots.over_steps(schemes, "hessian", [
                ("Hessian top eigenvalue", "eigenvalue", "log", "λ_max"),
                ("Hessian trace (Hutchinson)", "trace", "symlog", "tr H")]))]
