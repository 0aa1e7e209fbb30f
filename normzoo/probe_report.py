"""How ``normzoo report`` and ``sweep.csv`` present one probe's records: the probe's side of the report contract.

A probe class names its report with a class attribute ``report = "package.module:Attr"`` (an import path, so that
the presentation code loads only when a report or a sweep.csv is written, never when training starts). ``Attr``
is a :class:`ProbeReport` subclass; it is built with the probe's name. A probe that names none, or whose plugin
is not installed when the report is written, gets the generic :class:`ProbeReport`: the medians of its numeric
scalars in ``sweep.csv`` and in a table, and those scalars over steps in one figure.

This module imports neither matplotlib nor torch: figures receive the report's plotting helpers
(:class:`normzoo.report.figures.Plots`) as an argument rather than importing them.
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: importing them would import matplotlib
    from normzoo.report.figures import Plots
    from normzoo.report.schemes import Scheme

Records = Sequence[dict[str, Any]]
Config = dict[str, Any]

# Record fields that describe the measurement rather than measure anything.
BOOKKEEPING_FIELDS = frozenset({"step", "batch_size", "seconds", "drift_from", "iterations"})
# The generic figure draws at most this many scalars (one panel each), in the records' order.
GENERIC_PANELS = 4


@dataclass(frozen=True)
class Column:
    """A summary scalar (a key :meth:`ProbeReport.summarize` returns) shown in the report's ranking table.

    ``smoothness``: this is the measure schemes are ranked by (lower is smoother). ``per_record`` names the
    record field the same measure is read from at each probe; with it (and a ``loss`` field in the records) the
    ranking also compares schemes at a matched training loss. ``symbol`` is the measure's short name in sentences
    ("β at matched loss") and ``description`` what it is, in the sentence that explains the ranking.
    ``correlate``: also correlate this column with the steps to the target accuracy.
    """

    key: str
    label: str
    smoothness: bool = False
    per_record: str | None = None
    symbol: str = ""
    description: str = ""
    correlate: bool = False


@dataclass(frozen=True)
class ReportFigure:
    """One figure of the report (of a probe's section, or the training figures): ``draw(schemes, plots)`` returns
    a matplotlib figure, or None when the schemes have no records for it.

    ``per_setting``: drawn once per setting (say per learning rate) when values are not comparable across them.
    """

    name: str
    heading: str
    caption: str
    draw: Callable[[Sequence[Scheme], Plots], Any]
    per_setting: bool = True


class ProbeReport:
    """The generic presentation of a probe; subclass it to give a probe its own summaries, figures and columns."""

    columns: Sequence[Column] = ()
    # The summary keys of the probe's table of medians (None: every key summarize returns).
    table: Sequence[str] | None = None

    def __init__(self, probe: str) -> None:
        self.probe = probe

    @property
    def heading(self) -> str:
        return f"Probe `{self.probe}`"

    def key(self, name: str) -> str:
        """The summary key of ``name``: ``<probe>_<name>_median``, the sweep.csv column name."""
        return f"{self.probe.replace('-', '_')}_{name}_median"

    def label(self, key: str) -> str:
        """A summary key as a table header: the field it summarizes."""
        return key.removeprefix(self.probe.replace("-", "_") + "_").removesuffix("_median")

    def summarize(self, records: Records, config: Config | None) -> dict[str, float]:
        """Scalars for the tables and sweep.csv: the median over the run of every numeric scalar field.

        ``config`` is the run's config.json (None where unknown), for values relative to its settings."""
        return {self.key(name): median(r.get(name) for r in records) for name in scalar_fields(records)}

    def figures(self) -> list[ReportFigure]:
        return [ReportFigure(self.probe, self.heading,
                            f"The scalars `{self.probe}` records, over steps (mean over seeds, min–max shaded): the "
                            "generic view of a probe without a report of its own.", self._scalars_over_steps)]

    def _scalars_over_steps(self, schemes: Sequence[Scheme], plots: Plots) -> Any:
        records = [r for scheme in schemes for run in scheme.runs for r in run.probes.get(self.probe, [])]
        panels = [(name, name, "linear", name) for name in scalar_fields_in_order(records)[:GENERIC_PANELS]]
        return plots.over_steps(schemes, self.probe, panels) if panels else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def median(values: Iterable[Any]) -> float:
    """The median of the finite numbers among ``values``; NaN when there are none."""
    finite = sorted(float(v) for v in values if is_number(v) and math.isfinite(v))
    if not finite:
        return math.nan
    middle = len(finite) // 2
    return finite[middle] if len(finite) % 2 else (finite[middle - 1] + finite[middle]) / 2


def scalar_fields_in_order(records: Records) -> list[str]:
    """The numeric scalar fields of ``records`` (bookkeeping aside), in the order the probe first wrote them."""
    names: dict[str, None] = {}
    for record in records:
        names |= {k: None for k, v in record.items() if k not in BOOKKEEPING_FIELDS and is_number(v)}
    return list(names)


def scalar_fields(records: Records) -> list[str]:
    return sorted(scalar_fields_in_order(records))


def report_for(probe: str) -> ProbeReport:
    """The report a probe's class names, from the probes registry; the generic one when the probe names none, is
    not registered here (its plugin is not installed), or its report cannot be loaded (said once on stderr)."""
    from normzoo.errors import NormzooError
    from normzoo.plugins import registry

    try:
        path = registry("probes").get(probe).report
    except NormzooError:
        return ProbeReport(probe)
    if not path:
        return ProbeReport(probe)
    try:
        report = load(path)(probe)
        if not isinstance(report, ProbeReport):
            raise TypeError(f"{type(report).__name__} is not a normzoo.probe_report.ProbeReport")
    except Exception as exc:  # a plugin's broken report must not take the report down
        _say_once(f"normzoo: probe '{probe}': its report '{path}' cannot be used ({type(exc).__name__}: {exc}); "
                  "showing the generic section")
        return ProbeReport(probe)
    return report


@functools.lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    print(message, file=sys.stderr)


def load(path: str) -> type[ProbeReport]:
    """The class an import path ``"package.module:Attr"`` names."""
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"a probe report is named as 'module:attr', got {path!r}")
    return getattr(importlib.import_module(module), attr)
