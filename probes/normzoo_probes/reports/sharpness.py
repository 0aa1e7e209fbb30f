"""``sharpness``'s report: λ_max over training against the stability threshold of each learning rate (Cohen et
al. 2021: at the edge of stability λ_max settles at the threshold), and λ_max / threshold as a ranking column."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from normzoo.probe_report import Column, ProbeReport, ReportFigure

if TYPE_CHECKING:
    from normzoo.report.figures import Plots
    from normzoo.report.schemes import Scheme


class SharpnessReport(ProbeReport):
    columns = (Column("sharpness_relative_median", "λ_max / stability threshold"),)
    table = ("sharpness_eigenvalue_median", "sharpness_threshold_median", "sharpness_relative_median")

    @property
    def heading(self) -> str:
        return "Sharpness and the edge of stability"

    def figures(self) -> list[ReportFigure]:
        return [ReportFigure(
            "sharpness", self.heading,
            "Left: the top Hessian eigenvalue λ_max over training, dashed: the stability threshold of each learning "
            "rate (2/η, (2 + 2μ)/η with momentum μ; it follows the learning-rate schedule). Right: λ_max / "
            "threshold; ≈ 1 at the edge of stability (Cohen et al. 2021).", eigenvalue_and_threshold,
            per_setting=False)]


def eigenvalue_and_threshold(schemes: Sequence[Scheme], plots: Plots) -> Any:
    fig, axes = plots.grid(2)
    drawn = False
    for scheme in schemes:
        drawn |= plots.curve(axes[0], scheme, "sharpness", "eigenvalue")
        plots.curve(axes[1], scheme, "sharpness", "relative", label=False)
    # One threshold per learning rate: every run at that rate has the same one, so the first run's records draw it.
    first_run_at: dict[Any, Any] = {}
    for run in (run for scheme in schemes for run in scheme.runs if run.probes.get("sharpness")):
        first_run_at.setdefault(run.config.get("lr"), run)
    for lr, run in sorted(first_run_at.items(), key=lambda item: str(item[0])):
        steps, thresholds = plots.values(run.probes["sharpness"], "threshold")
        if len(steps):
            axes[0].plot(steps, thresholds, color="grey", linestyle="--", linewidth=1,
                         marker="_" if len(steps) == 1 else None)
            label = f"threshold, lr={lr:g}" if isinstance(lr, (int, float)) else "threshold"
            axes[0].annotate(label, (steps[-1], thresholds[-1]), fontsize=7, color="grey", ha="right", va="bottom")
    axes[1].axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes[0].set(title="sharpness λ_max (dashed: stability threshold)", xlabel="step", ylabel="λ_max", yscale="log")
    axes[1].set(title="λ_max / stability threshold", xlabel="step", ylabel="relative", yscale="log")
    return plots.finish(fig, axes, drawn)
