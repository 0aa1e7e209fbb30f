"""The report's figures (matplotlib, Agg): one function per figure, each ``None`` when its records are missing.

Each scheme keeps one colour (by norm) and one line style (by the other varying options) in every figure; curves
are the mean over seeds with the min–max range over seeds shaded; log scales follow the paper's figures.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from normzoo.analysis import Run  # noqa: E402
from normzoo.report.schemes import Scheme  # noqa: E402

STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]  # from the fifth setting of one norm on, line styles alone repeat
Records = Callable[[Run], Sequence[dict[str, Any]]]


class Palette:
    """The same colour for a norm and the same line style for a setting in every figure."""

    def __init__(self, schemes: Sequence[Scheme]) -> None:
        families = list(dict.fromkeys(s.family for s in schemes))
        colours = plt.get_cmap("tab10").colors
        self.colour = {f: colours[i % len(colours)] for i, f in enumerate(families)}
        self.style: dict[str, dict[str, Any]] = {}
        seen: dict[str, int] = {}
        for scheme in schemes:
            i = seen.get(scheme.family, 0)
            many = sum(s.family == scheme.family for s in schemes) > len(STYLES)
            self.style[scheme.label] = {"linestyle": STYLES[i % len(STYLES)],
                                        **({"marker": MARKERS[i // len(STYLES) % len(MARKERS)]} if many else {})}
            seen[scheme.family] = i + 1

    def kwargs(self, scheme: Scheme, **defaults: Any) -> dict[str, Any]:
        """Plot keywords for ``scheme``; ``defaults`` (say a marker) give way to what tells schemes apart."""
        return defaults | {"color": self.colour[scheme.family], "label": scheme.label, **self.style[scheme.label]}


def seed_band(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Mean, min and max over seeds at every step any seed logged (a diverged seed just stops contributing)."""
    steps = np.unique(np.concatenate([s for s, _ in curves])) if curves else np.array([])
    table = np.full((len(curves), len(steps)), np.nan)
    for i, (s, v) in enumerate(curves):
        table[i, np.searchsorted(steps, s)] = v
    with _quiet_nan_warnings():
        return steps, np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)


@contextlib.contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    """All-NaN columns (a step only a diverged seed logged) are expected; their warnings are noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _values(records: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], float] | str) -> tuple[np.ndarray, ...]:
    get = key if callable(key) else (lambda r: r.get(key))
    pairs = [(r["step"], get(r)) for r in records]
    pairs = [(s, float(v)) for s, v in pairs if isinstance(v, (int, float)) and v is not None]
    return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)


def plot_over_seeds(ax: Any, scheme: Scheme, palette: Palette, records: Records, key: Any, *,
                    label: bool = True) -> bool:
    curves = [_values(records(run), key) for run in scheme.runs]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return False
    steps, mean, low, high = seed_band(curves)
    style = palette.kwargs(scheme) | ({} if label else {"label": None})
    ax.plot(steps, mean, **style)
    if len(curves) > 1:
        ax.fill_between(steps, low, high, color=style["color"], alpha=0.15, linewidth=0)
    return True


def _figure(panels: int, width: float = 5.0) -> tuple[Figure, list[Any]]:
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, 3.6), squeeze=False)
    return fig, list(axes[0])


def _finish(fig: Figure, axes: Sequence[Any], drawn: bool) -> Figure | None:
    if not drawn:
        plt.close(fig)
        return None
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False,
                   bbox_to_anchor=(0.5, -0.02))
    for ax in axes:
        ax.grid(True, alpha=0.3, which="both")
    legend_rows = math.ceil(len(labels) / min(max(len(labels), 1), 6))
    fig.tight_layout(rect=(0, 0.05 + 0.06 * legend_rows if handles else 0, 1, 1))
    return fig


def _panels(schemes: Sequence[Scheme], palette: Palette,
            panels: Sequence[tuple[str, Records, Any, str, str]], xlabel: str = "step") -> Figure | None:
    """A row of panels, each (title, records of a run, value key, y scale, y label), one curve per scheme."""
    fig, axes = _figure(len(panels))
    drawn = False
    for ax, (title, records, key, scale, ylabel) in zip(axes, panels):
        for scheme in schemes:
            drawn |= plot_over_seeds(ax, scheme, palette, records, key)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, yscale=scale)
    return _finish(fig, axes, drawn)


def training(schemes: Sequence[Scheme], palette: Palette) -> Figure | None:
    """Santurkar et al. Fig. 1: training loss and accuracy, test accuracy."""
    return _panels(schemes, palette, [
        ("training loss", lambda r: r.train, "loss", "log", "loss"),
        ("training accuracy", lambda r: r.train, "acc", "linear", "accuracy"),
        ("test accuracy", lambda r: r.evals, "acc", "linear", "accuracy"),
    ])


def _probe(name: str) -> Records:
    return lambda run: run.probes.get(name, [])


def landscape(schemes: Sequence[Scheme], palette: Palette) -> Figure | None:
    """Santurkar et al. Fig. 4, 12, 13: the loss-variation band, the gradient-predictiveness band and β."""
    fig, axes = _figure(3)
    drawn = False
    for scheme in schemes:
        for ax, (low, high) in zip(axes, [("loss_min", "loss_max"), ("grad_dist_min", "grad_dist_max")]):
            curves = [(_values(_probe("landscape")(run), low), _values(_probe("landscape")(run), high))
                      for run in scheme.runs]
            curves = [c for c in curves if len(c[0][0])]
            if not curves:
                continue
            steps, lo, _, _ = seed_band([c[0] for c in curves])
            _, hi, _, _ = seed_band([c[1] for c in curves])
            style = palette.kwargs(scheme)
            ax.fill_between(steps, lo, hi, color=style["color"], alpha=0.3, linewidth=0)
            ax.plot(steps, hi, **style)
            ax.plot(steps, lo, **(style | {"label": None}))
            drawn = True
        plot_over_seeds(axes[2], scheme, palette, _probe("landscape"), "beta", label=False)
    axes[0].set(title="loss variation: L(θ − ηg) over η", xlabel="step", ylabel="loss", yscale="log")
    axes[1].set(title="gradient predictiveness: ‖∇L(θ) − ∇L(θ − ηg)‖", xlabel="step", ylabel="ℓ2 distance",
                yscale="log")
    axes[2].set(title="effective β-smoothness", xlabel="step", ylabel="β", yscale="log")
    return _finish(fig, axes, drawn)


def matched(schemes: Sequence[Scheme], palette: Palette, level: float) -> Figure | None:
    """β against the training loss at which it was measured: equal steps are not equal progress."""
    fig, axes = _figure(2)
    drawn = False
    for scheme in schemes:
        drawn |= plot_over_seeds(axes[0], scheme, palette, _probe("landscape"), "loss")
        for run in scheme.runs:
            records = [r for r in run.probes.get("landscape", []) if _positive(r.get("beta"))]
            if records:
                axes[1].plot([r["loss"] for r in records], [r["beta"] for r in records],
                             **(palette.kwargs(scheme, marker="o", markersize=3) | {"label": None}))
    for ax in axes:
        if math.isfinite(level):
            ax.axhline(level, color="grey", linewidth=1) if ax is axes[0] else ax.axvline(level, color="grey",
                                                                                           linewidth=1)
    axes[0].set(title="probe-batch loss (grey: matched loss)", xlabel="step", ylabel="loss", yscale="log")
    axes[1].set(title="β against training loss (right: early training)", xlabel="loss at the probe",
                ylabel="β", xscale="log", yscale="log")
    return _finish(fig, axes, drawn)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def per_layer(schemes: Sequence[Scheme], palette: Palette, probe: str,
              panels: Sequence[tuple[str, str, str]], *, last_only: bool = False) -> Figure | None:
    """Per-layer values (median over probes and seeds, or the last probe) against depth."""
    fig, axes = _figure(len(panels))
    drawn = False
    for ax, (key, title, scale) in zip(axes, panels):
        for scheme in schemes:
            rows = [r[key] for run in scheme.runs for r in (run.probes.get(probe, [])[-1:] if last_only else
                                                             run.probes.get(probe, [])) if r.get(key)]
            width = min((len(r) for r in rows), default=0)
            if not width:
                continue
            table = np.array([[abs(v) if v is not None else np.nan for v in r[:width]] for r in rows], dtype=float)
            if scale == "log":  # ICS of the first layer is 0 by definition: no point on a log axis
                table[table <= 0] = np.nan
            with _quiet_nan_warnings():
                ax.plot(np.arange(1, width + 1), np.nanmedian(table, 0),
                        **palette.kwargs(scheme, marker="o", markersize=3))
            drawn = True
        ax.set(title=title, xlabel="tracked layer (input → output)", yscale=scale)
    return _finish(fig, axes, drawn)


def _layer_mean(key: str) -> Callable[[dict[str, Any]], float]:
    def mean(record: dict[str, Any]) -> float:
        values = [abs(v) for v in record.get(key) or [] if isinstance(v, (int, float)) and math.isfinite(v)]
        return float(np.mean(values)) if values else math.nan

    return mean


def activations(schemes: Sequence[Scheme], palette: Palette) -> Figure | None:
    """Santurkar et al. Fig. 2/8: how far each layer's input distribution moves between measurements."""
    return _panels(schemes, palette, [
        ("drift of the per-channel mean (layer average)", _probe("activations"), _layer_mean("in_drift_mean"),
         "log", "|Δµ|"),
        ("drift of the per-channel variance (layer average)", _probe("activations"), _layer_mean("in_drift_var"),
         "log", "|Δσ²|"),
    ])


def hessian(schemes: Sequence[Scheme], palette: Palette) -> Figure | None:
    return _panels(schemes, palette, [("Hessian top eigenvalue", _probe("hessian"), "eigenvalue", "log", "λ_max"),
                                      ("Hessian trace (Hutchinson)", _probe("hessian"), "trace", "symlog", "tr H")])


def step_loss(schemes: Sequence[Scheme], palette: Palette) -> Figure | None:
    """Bjorck et al.: the relative loss after one step along −g, against the step size (last probe)."""
    fig, axes = _figure(1, 6.0)
    drawn = False
    for scheme in schemes:
        for i, run in enumerate(scheme.runs):
            records = run.probes.get("step-loss", [])
            if records:
                last = records[-1]
                axes[0].plot(last["step_sizes"], last["ratios"],
                             **(palette.kwargs(scheme, marker="o", markersize=3) | ({} if i == 0 else {"label": None})))
                drawn = True
    axes[0].axhline(1.0, color="grey", linewidth=1)
    axes[0].set(title="loss after one step / loss before (last probe)", xlabel="step size", ylabel="ratio",
                xscale="log", yscale="log")
    return _finish(fig, axes, drawn)


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def by_learning_rate(schemes: Sequence[Scheme], palette: Palette) -> Figure | None:
    """Bjorck et al.: final training and test accuracy against the learning rate, one line per norm (only when the
    norm and the learning rate are all that vary)."""
    if not schemes or any(set(s.settings) - {"norm", "lr"} or "lr" not in s.settings for s in schemes):
        return None
    fig, axes = _figure(2)
    for family in dict.fromkeys(s.family for s in schemes):
        members = sorted((s for s in schemes if s.family == family), key=lambda s: float(s.settings["lr"]))
        lrs = [float(s.settings["lr"]) for s in members]
        for ax, key in zip(axes, ("train_acc", "test_acc")):
            ax.plot(lrs, [s.mean(key) for s in members], marker="o", color=palette.colour[family], label=family)
    for ax, title in zip(axes, ("final training accuracy", "final test accuracy")):
        ax.set(title=title, xlabel="learning rate", ylabel="accuracy", xscale="log")
    return _finish(fig, axes, True)
