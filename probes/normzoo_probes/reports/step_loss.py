"""``step-loss``'s report: the relative loss after one step along −g against the step size (Bjorck et al.)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from normzoo.probe_report import ProbeReport, ReportFigure

if TYPE_CHECKING:
    from normzoo.report.figures import Plots
    from normzoo.report.schemes import Scheme


class StepLossReport(ProbeReport):
    @property
    def heading(self) -> str:
        return "One step along the gradient"

    def figures(self) -> list[ReportFigure]:
        return [ReportFigure(
            "step-loss", self.heading,
            "Loss after one step of size η along −g relative to the loss before, at the last probe (Bjorck et al. "
            "2018): where the ratio stays below 1 the scheme tolerates that learning rate.", ratios_at_last_probe,
            per_setting=False)]


def ratios_at_last_probe(schemes: Sequence[Scheme], plots: Plots) -> Any:
    fig, axes = plots.grid(1, 6.0)
    drawn = False
    for scheme in schemes:
        for i, run in enumerate(scheme.runs):
            records = run.probes.get("step-loss", [])
            if records:
                last = records[-1]
                axes[0].plot(last["step_sizes"], last["ratios"], **(plots.palette.kwargs(scheme, marker="o",
                                                                                         markersize=3)
                                                                    | ({} if i == 0 else {"label": None})))
                drawn = True
    axes[0].axhline(1.0, color="grey", linewidth=1)
    axes[0].set(title="loss after one step / loss before (last probe)", xlabel="step size", ylabel="ratio",
                xscale="log", yscale="log")
    return plots.finish(fig, axes, drawn)
