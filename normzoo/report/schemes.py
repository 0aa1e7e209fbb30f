"""Runs grouped into schemes (same settings, different seeds) and the comparison that answers the question:
does smoothness go with optimization speed, at equal steps and at equal loss?

Which number is "smoothness" is not the core's to say: a probe's report declares it (a :class:`Column` with
``smoothness=True``, see :mod:`normzoo.probe_report`), and the first probe of the runs that declares one is used."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from normzoo.analysis import Run, probe_summaries, spearman, steps_to_accuracy, value_at_loss, varying_fields
from normzoo.errors import NormzooError
from normzoo.probe_report import Column, report_for
from normzoo.spec import Param

# A scheme whose training loss ends above this fraction of its first loss never left its initial plateau.
PLATEAU_FRACTION = 0.9


def short_value(key: str, value: Any) -> str:
    """A spec with its defaults left out (``lp:inf``, ``vgg11,width=0.25`` rather than every parameter); other
    values as they are."""
    if key in ("norm", "backbone", "dataset") and isinstance(value, str):
        try:
            from normzoo.plugins import registry

            resolved = registry({"norm": "norms", "backbone": "backbones", "dataset": "datasets"}[key]).resolve(value)
        except NormzooError:  # a plugin that is not installed here: show the spec as stored
            return value
        defaults = {p.name: p.default for p in resolved.entry.params}
        changed = [f"{name}={Param(name, type(v), v).format(v)}" for name, v in resolved.spec.args
                   if name != resolved.spec.positional and v != defaults.get(name)]
        return ",".join([resolved.short(), *changed])
    return str(value)


@dataclass(frozen=True)
class Measure:
    """The smoothness measure schemes are ranked by: a column a probe's report declares ``smoothness``."""

    probe: str
    column: Column

    @property
    def label(self) -> str:
        return self.column.label

    @property
    def symbol(self) -> str:
        return self.column.symbol or self.column.label


def probes_in(runs: Sequence[Run]) -> list[str]:
    """The probes the runs recorded: in the order their configs list them, then any others by name."""
    listed = [str(spec).split(":")[0] for run in runs for spec in run.config.get("probes") or []]
    recorded = {name for run in runs for name in run.probes}
    return [name for name in dict.fromkeys(listed) if name in recorded] + sorted(recorded - set(listed))


def declared_columns(runs: Sequence[Run]) -> list[tuple[str, Column]]:
    """(probe, column) for every ranking-table column the runs' probes' reports declare."""
    return [(probe, column) for probe in probes_in(runs) for column in report_for(probe).columns]


def smoothness_of(runs: Sequence[Run]) -> Measure | None:
    return next((Measure(probe, column) for probe, column in declared_columns(runs) if column.smoothness), None)


@dataclass
class Scheme:
    """The runs (one per seed) of one setting of the varying options."""

    label: str
    family: str  # the norm as the user would type it; sets the colour
    runs: list[Run]
    settings: dict[str, str]

    context: dict[str, Any] = field(default_factory=dict)  # the smoothness measure, target accuracy, matched loss
    _stats: dict[tuple[Any, ...], dict[str, float]] = field(default_factory=dict, repr=False)

    @property
    def setting(self) -> str:
        """What besides the norm defines this scheme (``lr=0.1``); schemes are compared within one setting,
        because a smoothness measure need not be comparable across learning rates."""
        return " ".join(f"{k}={v}" for k, v in self.settings.items() if k != "norm")

    @property
    def measure(self) -> Measure | None:
        """The smoothness measure :func:`compute` chose for all schemes, or, without one, this scheme's own."""
        return self.context["measure"] if "measure" in self.context else smoothness_of(self.runs)

    def per_seed(self, key: str) -> dict[int, float]:
        return {run.seed: self.stats(run).get(key, math.nan) for run in self.runs}

    def stats(self, run: Run) -> dict[str, float]:
        key = (id(run), *sorted(self.context.items()))
        if key not in self._stats:
            self._stats[key] = run_stats(run, self.context, self.measure)
        return self._stats[key]

    def mean(self, key: str) -> float:
        return _nanmean(self.per_seed(key).values())

    def spread(self, key: str) -> float:
        values = [v for v in self.per_seed(key).values() if math.isfinite(v)]
        return float(np.std(values)) if len(values) > 1 else math.nan

    @property
    def plateaued(self) -> bool:
        """On average over seeds, the last logged training loss is still ≥ PLATEAU_FRACTION of the first."""
        ratios = [loss_ratio(run) for run in self.runs]
        ratios = [r for r in ratios if math.isfinite(r)]
        return bool(ratios) and float(np.mean(ratios)) >= PLATEAU_FRACTION


def _nanmean(values: Any) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else (math.inf if any(v == math.inf for v in values) else math.nan)


def loss_ratio(run: Run) -> float:
    """Last logged training loss over the first (NaN for a run with fewer than two records or a diverged one)."""
    if len(run.train) < 2 or run.status == "diverged":
        return math.nan
    first, last = run.train[0].get("loss"), run.train[-1].get("loss")
    return last / first if _finite(first) and _finite(last) and first > 0 else math.nan


def group_schemes(runs: Sequence[Run]) -> list[Scheme]:
    """One scheme per distinct setting of the fields that vary (seed aside), in first-seen order."""
    fields = varying_fields(runs) or ["norm"]
    schemes: dict[tuple[str, ...], Scheme] = {}
    for run in runs:
        settings = {k: short_value(k, run.config.get(k)) for k in fields}
        key = tuple(settings.values())
        if key not in schemes:
            label = " ".join(v if k == "norm" else f"{k}={v}" for k, v in settings.items())
            family = short_value("norm", run.config.get("norm"))
            schemes[key] = Scheme(label, family, [], settings)
        schemes[key].runs.append(run)
    return list(schemes.values())


def run_stats(run: Run, context: dict[str, Any], measure: Measure | None) -> dict[str, float]:
    """The numbers of one run the comparison uses: its final ones, the steps to the target accuracy, every probe
    summary, and ``smoothness`` (at equal steps) and ``smoothness_matched`` (at the matched loss) from
    ``measure``; ``context`` holds the target accuracy and matched loss."""
    summary = probe_summaries(run.probes, run.config)
    acc_target, loss_level = context.get("target_acc", math.nan), context.get("matched_loss", math.nan)
    stats = {
        **summary,
        "train_loss": run.final("train_loss"), "train_acc": run.final("train_acc"),
        "test_acc": run.final("test_acc"),
        "steps_to_target": steps_to_accuracy(run, acc_target) if math.isfinite(acc_target) else math.nan,
        "smoothness": math.nan, "smoothness_matched": math.nan,
    }
    if measure is not None:
        stats["smoothness"] = summary.get(measure.column.key, math.nan)
        if measure.column.per_record and math.isfinite(loss_level):
            stats["smoothness_matched"] = value_at_loss(run.probes.get(measure.probe, []), measure.column.per_record,
                                                        loss_level)
    return stats


def choose_targets(schemes: Sequence[Scheme], target_acc: float | None) -> dict[str, float]:
    """The target training accuracy (default: 80 % of the best scheme's final one, down to a multiple of 5 %)
    and the matched loss: the lowest probe-batch loss (the ``loss`` field of the smoothness measure's probe) that
    every scheme that trained reaches."""
    finals = [s.mean("train_acc") for s in schemes]
    finals = [f for f in finals if math.isfinite(f)]
    if target_acc is None and finals:
        target_acc = math.floor(0.8 * max(finals) * 20) / 20
    lows = []
    for scheme in schemes:
        if scheme.plateaued:
            continue
        probe = scheme.measure.probe if scheme.measure else ""
        losses = [min((r["loss"] for r in run.probes.get(probe, []) if _finite(r.get("loss"))),
                      default=math.nan) for run in scheme.runs]
        lows.append(max(losses) if losses else math.nan)
    lows = [v for v in lows if math.isfinite(v)]
    return {"target_acc": target_acc if target_acc is not None else math.nan,
            "matched_loss": max(lows) if lows else math.nan}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def correlations(schemes: Sequence[Scheme]) -> list[dict[str, Any]]:
    """Spearman ρ across schemes, per seed, between the smoothness measure (and the columns the probes' reports
    mark ``correlate``) and a speed/accuracy measure; each row names its ``x`` and ``y`` stats."""
    measure = schemes[0].measure if schemes else None
    if measure is None:
        return []
    smoothness = [("smoothness", f"{measure.label} (equal steps)")]
    if measure.column.per_record:
        smoothness.append(("smoothness_matched", f"{measure.symbol} at matched loss"))
    pairs = [(x, y, f"{x_name} vs {y_name}") for y, y_name in (("steps_to_target", "steps to target accuracy"),
                                                                ("test_acc", "final test accuracy"))
             for x, x_name in smoothness]
    pairs += [(column.key, "steps_to_target", f"{column.label} vs steps to target accuracy")
              for _, column in declared_columns([run for s in schemes for run in s.runs]) if column.correlate]
    seeds = sorted({run.seed for s in schemes for run in s.runs})
    rows = []
    for x, y, title in pairs:
        rhos = []
        for seed in seeds:
            xs = [s.per_seed(x).get(seed, math.nan) for s in schemes]
            ys = [s.per_seed(y).get(seed, math.nan) for s in schemes]
            if y == "test_acc":  # higher accuracy is better: rank its negation so ρ > 0 means "smoother is better"
                ys = [-v for v in ys]
            rhos.append(spearman(xs, ys))
        finite = [r for r in rhos if math.isfinite(r)]
        rows.append({"x": x, "y": y, "comparison": title, "rho_mean": float(np.mean(finite)) if finite else math.nan,
                     "rho_min": min(finite, default=math.nan), "rho_max": max(finite, default=math.nan),
                     "seeds": len(finite), "schemes": len(schemes)})
    return rows


def by_setting(schemes: Sequence[Scheme]) -> dict[str, list[Scheme]]:
    groups: dict[str, list[Scheme]] = {}
    for scheme in schemes:
        groups.setdefault(scheme.setting, []).append(scheme)
    return groups


def compute(runs: Sequence[Run], target_acc: float | None = None) -> tuple[list[Scheme], dict[str, float]]:
    """Schemes with their context: one smoothness measure and one target accuracy for all, a matched loss per
    setting."""
    schemes = group_schemes(runs)
    measure = smoothness_of(runs)
    for scheme in schemes:
        scheme.context = {"measure": measure}
    targets = choose_targets(schemes, target_acc)
    for group in by_setting(schemes).values():
        matched = choose_targets(group, targets["target_acc"])["matched_loss"]
        for scheme in group:
            scheme.context = {"measure": measure, "target_acc": targets["target_acc"], "matched_loss": matched}
    return schemes, targets
