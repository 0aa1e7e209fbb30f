"""``landscape``'s report: β is the ranking's smoothness measure (also at a matched loss and relative to the
stability threshold), the loss and gradient bands, and Santurkar et al.'s figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from normzoo.probe_report import Column, Config, ProbeReport, Records, ReportFigure, is_number, median
from normzoo_probes.stability import config_threshold

if TYPE_CHECKING:
    from normzoo.report.figures import Plots
    from normzoo.report.schemes import Scheme


def _difference(record: dict[str, Any], high: str, low: str) -> float:
    a, b = record.get(high), record.get(low)
    return float(a) - float(b) if is_number(a) and is_number(b) else math.nan


class LandscapeReport(ProbeReport):
    columns = (
        Column("landscape_beta_median", "median β", smoothness=True, per_record="beta", symbol="β",
               description="the median effective β-smoothness over training (Santurkar et al. §3.2)"),
        Column("landscape_beta_relative_median", "β / stability threshold"),
        Column("landscape_loss_band_median", "loss band", correlate=True),
        Column("landscape_grad_band_median", "gradient band"),
        Column("landscape_sphere_beta_median", "median β on the sphere"),
    )
    table = ("landscape_beta_median", "landscape_beta_relative_median", "landscape_sphere_beta_median",
             "landscape_loss_band_median", "landscape_grad_band_median", "landscape_grad_norm_median")

    @property
    def heading(self) -> str:
        return "Loss landscape along the gradient"

    def summarize(self, records: Records, config: Config | None) -> dict[str, float]:
        """Adds the band widths and β relative to the stability threshold of the run's optimizer, (2 + 2μ)/η for
        SGD with heavy-ball momentum μ at the configured learning rate η (2/η without momentum): β above it means
        a quadratic that curved would make the run's steps diverge."""
        summary = super().summarize(records, config)
        summary[self.key("loss_band")] = median(_difference(r, "loss_max", "loss_min") for r in records)
        summary[self.key("grad_band")] = median(_difference(r, "grad_dist_max", "grad_dist_min") for r in records)
        summary[self.key("beta_relative")] = summary.get(self.key("beta"), math.nan) / config_threshold(config)
        return summary

    def figures(self) -> list[ReportFigure]:
        return [
            ReportFigure("landscape", self.heading,
                         "Loss variation and gradient predictiveness: the range of L(θ − ηg) and of "
                         "‖∇L(θ) − ∇L(θ − ηg)‖ over the probe's step sizes η, and the effective β-smoothness "
                         "(Santurkar et al. Fig. 4, 12, 13).", bands_and_beta),
            ReportFigure("landscape-sphere", "β on the sphere",
                         "Effective β-smoothness of the walk on the sphere of each scale-invariant weight "
                         "(``view=sphere``): unlike plain β it does not shrink as those weights grow.",
                         lambda schemes, plots: plots.over_steps(
                             schemes, "landscape", [("effective β on the sphere", "sphere_beta", "log", "β")])),
            ReportFigure("matched", "Equal steps or equal progress?",
                         "Left: the training loss at each probe (grey: the matched loss); right: β against that "
                         "loss. A scheme still on its initial plateau sits at the right with a small β: compare "
                         "schemes at the same loss, not the same step.", matched),
        ]


def bands_and_beta(schemes: Sequence[Scheme], plots: Plots) -> Any:
    fig, axes = plots.grid(3)
    drawn = False
    for scheme in schemes:
        for ax, (low, high) in zip(axes, [("loss_min", "loss_max"), ("grad_dist_min", "grad_dist_max")]):
            curves = [(plots.values(run.probes.get("landscape", []), low),
                       plots.values(run.probes.get("landscape", []), high)) for run in scheme.runs]
            curves = [c for c in curves if len(c[0][0])]
            if not curves:
                continue
            steps, lo, _, _ = plots.seed_band([c[0] for c in curves])
            _, hi, _, _ = plots.seed_band([c[1] for c in curves])
            style = plots.palette.kwargs(scheme)
            ax.fill_between(steps, lo, hi, color=style["color"], alpha=0.3, linewidth=0)
            ax.plot(steps, hi, **style)
            ax.plot(steps, lo, **(style | {"label": None}))
            drawn = True
        plots.curve(axes[2], scheme, "landscape", "beta", label=False)
    axes[0].set(title="loss variation: L(θ − ηg) over η", xlabel="step", ylabel="loss", yscale="log")
    axes[1].set(title="gradient predictiveness: ‖∇L(θ) − ∇L(θ − ηg)‖", xlabel="step", ylabel="ℓ2 distance",
                yscale="log")
    axes[2].set(title="effective β-smoothness", xlabel="step", ylabel="β", yscale="log")
    return plots.finish(fig, axes, drawn)


def matched(schemes: Sequence[Scheme], plots: Plots) -> Any:
    """β against the training loss at which it was measured: equal steps are not equal progress."""
    level = schemes[0].context.get("matched_loss", math.nan) if schemes else math.nan
    fig, axes = plots.grid(2)
    drawn = False
    for scheme in schemes:
        drawn |= plots.curve(axes[0], scheme, "landscape", "loss")
        for run in scheme.runs:
            records = [r for r in run.probes.get("landscape", []) if _positive(r.get("beta"))]
            if records:
                axes[1].plot([r["loss"] for r in records], [r["beta"] for r in records],
                             **(plots.palette.kwargs(scheme, marker="o", markersize=3) | {"label": None}))
    if math.isfinite(level):
        axes[0].axhline(level, color="grey", linewidth=1)
        axes[1].axvline(level, color="grey", linewidth=1)
    axes[0].set(title="probe-batch loss (grey: matched loss)", xlabel="step", ylabel="loss", yscale="log")
    axes[1].set(title="β against training loss (right: early training)", xlabel="loss at the probe",
                ylabel="β", xscale="log", yscale="log")
    return plots.finish(fig, axes, drawn)


def _positive(value: Any) -> bool:
    return is_number(value) and math.isfinite(value) and value > 0
