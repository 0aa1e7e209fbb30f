"""The report's figures (matplotlib, Agg): one function per figure, each ``None`` when its records are missing,
and :class:`Plots`, the helpers a probe's report draws its own figures with.

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
    if len(steps) == 1:  # a line through one point draws nothing (say, a run evaluated once)
        style.setdefault("marker", "o")
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


def _fitting_scale(ax: Any, scale: str) -> str:
    """``scale``, unless it is log and nothing drawn on ``ax`` is positive (say, drifts that are all 0): matplotlib
    cannot lay out such an axis, so it stays linear."""
    if scale != "log":
        return scale
    values = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    return scale if any(np.any(np.isfinite(v) & (v > 0)) for v in values) else "linear"


def _panels(schemes: Sequence[Scheme], palette: Palette,
            panels: Sequence[tuple[str, Records, Any, str, str]], xlabel: str = "step") -> Figure | None:
    """A row of panels, each (title, records of a run, value key, y scale, y label), one curve per scheme."""
    fig, axes = _figure(len(panels))
    drawn = False
    for ax, (title, records, key, scale, ylabel) in zip(axes, panels):
        for scheme in schemes:
            drawn |= plot_over_seeds(ax, scheme, palette, records, key)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, yscale=_fitting_scale(ax, scale))
    return _finish(fig, axes, drawn)


def training(schemes: Sequence[Scheme], palette: Palette) -> Figure | None:
    """Santurkar et al. Fig. 1: training loss and accuracy, test accuracy."""
    return _panels(schemes, palette, [
        ("training loss", lambda r: r.train, "loss", "log", "loss"),
        ("training accuracy", lambda r: r.train, "acc", "linear", "accuracy"),
        ("test accuracy", lambda r: r.evals, "acc", "linear", "accuracy"),
    ])


def _probe_records(probe: str) -> Records:
    return lambda run: run.probes.get(probe, [])


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
            if scale == "log":  # a layer whose value is 0 by definition (say the first one) has no point on a log axis
                table[table <= 0] = np.nan
            with _quiet_nan_warnings():
                ax.plot(np.arange(1, width + 1), np.nanmedian(table, 0),
                        **palette.kwargs(scheme, marker="o", markersize=3))
            drawn = True
        ax.set(title=title, xlabel="tracked layer (input → output)", yscale=_fitting_scale(ax, scale))
    return _finish(fig, axes, drawn)


class Plots:
    """What a probe's report draws with (:mod:`normzoo.probe_report`): the report's palette, so that a scheme has
    the same colour and line style in every figure, and its figure helpers. Handed to ``ProbeFigure.draw`` so that
    probes' report modules never import matplotlib themselves."""

    def __init__(self, palette: Palette) -> None:
        self.palette = palette

    def over_steps(self, schemes: Sequence[Scheme], probe: str, panels: Sequence[tuple[str, Any, str, str]]
                   ) -> Figure | None:
        """A row of panels of ``probe``'s values over steps, each (title, field or function of a record, y scale,
        y label): one curve per scheme, the mean over seeds with the min–max range shaded."""
        records = _probe_records(probe)
        return _panels(schemes, self.palette, [(title, records, key, scale, ylabel)
                                               for title, key, scale, ylabel in panels])

    def per_layer(self, schemes: Sequence[Scheme], probe: str, panels: Sequence[tuple[str, str, str]], *,
                  last_only: bool = False) -> Figure | None:
        """Per-layer list fields (field, title, y scale) against depth: the median over probes and seeds, or the
        last probe's."""
        return per_layer(schemes, self.palette, probe, panels, last_only=last_only)

    def curve(self, ax: Any, scheme: Scheme, probe: str, key: Any, *, label: bool = True) -> bool:
        """One scheme's curve of ``probe``'s ``key`` on ``ax``; False when it has no such records."""
        return plot_over_seeds(ax, scheme, self.palette, _probe_records(probe), key, label=label)

    @staticmethod
    def values(records: Sequence[dict[str, Any]], key: Any) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the records where ``key`` is a number."""
        return _values(records, key)

    @staticmethod
    def seed_band(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
        return seed_band(curves)

    @staticmethod
    def quiet_nan_warnings() -> Any:
        return _quiet_nan_warnings()

    @staticmethod
    def grid(panels: int, width: float = 5.0) -> tuple[Figure, list[Any]]:
        """A figure with a row of ``panels`` axes."""
        return _figure(panels, width)

    @staticmethod
    def finish(fig: Figure, axes: Sequence[Any], drawn: bool) -> Figure | None:
        """Legend and grid; None (and the figure closed) when nothing was drawn."""
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
