"""The learning-rate side of the report: does a normalization help at equal learning rate, or by letting a
network train at a larger one (Bjorck et al. 2018)? And is the smoothness a probe measures a property
of the scheme, or is it set by the learning rate, as the edge of stability predicts (β settles near 2/η)?

Pure functions of read-back runs, plus :func:`section`, which adds them to a report. The rules, in one place:

- **Trains.** A run trains if it did not diverge, logged at least two training records, its last logged training
  loss is below ``TRAIN_LOSS_FRACTION`` × its first, and — when the chance accuracy is known — its final test
  accuracy is above chance + ``CHANCE_MARGIN``. A scheme trains at a learning rate when more than half of its
  seeds there train. The largest trainable learning rate is the largest at which it does.
- **Outcome** of a run: the first step at which its training accuracy reaches the target (fewer is faster) when a
  target is given, else its final test accuracy. A diverged run never reaches the target and counts as accuracy 0.
  A scheme's outcome at a learning rate is the median over its seeds.
- **Own best learning rate**: the best median outcome; ties go to the better median test accuracy, then to the
  smaller learning rate. **Shared learning rate**: the one at which the most schemes train; ties go to the smaller.
- **Correlations**: Spearman ρ with a percentile bootstrap interval (:func:`spearman_ci`). The verdict rule is
  :func:`verdict`'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from normzoo.analysis import Run, probe_summaries, spearman, steps_to_accuracy
from normzoo.report.render import Document, Table, cell
from normzoo.report import schemes as ranking
from normzoo.report.schemes import PLATEAU_FRACTION, group_schemes, loss_ratio

# A run trains when its last training loss is below this fraction of its first: the same line that marks a scheme
# as never having left its initial plateau in the main comparison.
TRAIN_LOSS_FRACTION = PLATEAU_FRACTION
# ... and, when the number of classes is known, its final test accuracy beats chance by this much.
CHANCE_MARGIN = 0.05
# |ρ| at or above this, with an interval that excludes 0, is a strong relation for the verdict.
STRONG = 0.5
LEVEL = 0.9
N_BOOT = 2000


def smoothness_of(runs: Sequence[Run]) -> Callable[[Run], float]:
    """Each run's smoothness for this section: the summary value of the measure a probe's report declares as the
    smoothness measure (the one the ranking uses; NaN for every run when no probe declares one)."""
    measure = ranking.smoothness_of(runs)
    if measure is None:
        return lambda run: math.nan
    return lambda run: probe_summaries(run.probes, run.config).get(measure.column.key, math.nan)


def lr_of(run: Run) -> float:
    return float(run.config.get("lr", math.nan))


# -- trainability -----------------------------------------------------------------------------------------------
def trains(run: Run, *, chance: float | None = None) -> bool:
    """Whether ``run`` trained at its learning rate (rule in the module docstring). A loss ratio rather than an
    absolute loss, so that the rule holds for any dataset; the accuracy check guards against a loss that falls
    only by becoming confident about the majority class."""
    ratio = loss_ratio(run)  # NaN for a diverged run or one with fewer than two records
    if not (math.isfinite(ratio) and ratio < TRAIN_LOSS_FRACTION):
        return False
    return chance is None or run.final("test_acc") > chance + CHANCE_MARGIN


@dataclass
class LrScheme:
    """One scheme across learning rates: the runs sharing every varying setting except ``lr`` and the seed."""

    label: str
    runs: dict[float, list[Run]]  # by learning rate, ascending

    @property
    def lrs(self) -> list[float]:
        return list(self.runs)

    def trains_at(self, lr: float, *, chance: float | None = None) -> bool:
        """More than half of the seeds at ``lr`` train (a tie is not a majority)."""
        runs = self.runs.get(lr, [])
        return 2 * sum(trains(r, chance=chance) for r in runs) > len(runs) > 0

    def largest_trainable_lr(self, *, chance: float | None = None) -> float | None:
        return max((lr for lr in self.lrs if self.trains_at(lr, chance=chance)), default=None)


def lr_schemes(runs: Sequence[Run]) -> list[LrScheme]:
    """Group ``runs`` into schemes that span learning rates, in first-seen order: the report's schemes (every
    varying setting), merged over ``lr``."""
    merged: dict[tuple[tuple[str, str], ...], LrScheme] = {}
    for scheme in group_schemes(runs):
        rest = tuple((k, v) for k, v in scheme.settings.items() if k != "lr")
        label = " ".join(v if k == "norm" else f"{k}={v}" for k, v in rest) or "all runs"
        entry = merged.setdefault(rest, LrScheme(label, {}))
        for run in scheme.runs:
            entry.runs.setdefault(lr_of(run), []).append(run)
    for entry in merged.values():
        entry.runs = dict(sorted(entry.runs.items()))
    return list(merged.values())


def trainable_text(scheme: LrScheme, tested: Sequence[float], *, chance: float | None = None) -> str:
    """The largest trainable learning rate in words: "none" when it trains at no learning rate tested, "≥ η" when
    it still trains at the largest tested (the true limit may be higher)."""
    lr = scheme.largest_trainable_lr(chance=chance)
    if lr is None:
        return "none"
    return f"≥ {cell(lr)} (max tested)" if lr >= max(tested) else cell(lr)


def shared_lr(schemes: Sequence[LrScheme], *, chance: float | None = None) -> float | None:
    """The learning rate at which the most schemes train (ties: the smaller); None when none trains anywhere.
    Comparing schemes there asks whether normalization helps at equal learning rate."""
    counts = {lr: sum(s.trains_at(lr, chance=chance) for s in schemes) for s in schemes for lr in s.lrs}
    best = max(counts.values(), default=0)
    return min(lr for lr, n in counts.items() if n == best) if best else None


# -- outcomes ---------------------------------------------------------------------------------------------------
def _target(target_acc: float | None) -> float | None:
    """A usable target accuracy, or None (then the outcome is the final test accuracy)."""
    return target_acc if target_acc is not None and math.isfinite(target_acc) else None


def outcome(run: Run, target_acc: float | None) -> float:
    """Steps to ``target_acc`` (inf if never, or if the run diverged) when a target is given, else the final test
    accuracy (0 for a diverged run, NaN for a run without one)."""
    diverged = run.status == "diverged"
    if _target(target_acc) is not None:
        return math.inf if diverged else steps_to_accuracy(run, target_acc)
    return 0.0 if diverged else run.final("test_acc")


def median_outcome(runs: Sequence[Run], target_acc: float | None) -> float:
    """Median over seeds; runs without a number are left out, a never-reached target (inf) is kept."""
    values = [v for v in (outcome(r, target_acc) for r in runs) if not math.isnan(v)]
    return float(np.median(values)) if values else math.nan


def best_lr(scheme: LrScheme, target_acc: float | None) -> float | None:
    """The scheme's own best learning rate: fewest median steps to the target (or best median final test accuracy
    without a target); ties go to the better median test accuracy, then to the smaller learning rate. None when
    there is nothing to rank (no target and no test accuracy)."""
    target = _target(target_acc)

    def key(lr: float) -> tuple[float, float, float]:
        accuracy = median_outcome(scheme.runs[lr], None)
        steps = median_outcome(scheme.runs[lr], target) if target is not None else 0.0
        return steps, -accuracy if math.isfinite(accuracy) else math.inf, lr

    usable = [lr for lr in scheme.lrs if target is not None or key(lr)[1] != math.inf]
    return min(usable, key=key, default=None)


def best_scheme(schemes: Sequence[LrScheme], lrs: Sequence[float | None], target_acc: float | None
                ) -> tuple[str, float, float | None] | None:
    """The scheme with the best median outcome, each at its own entry of ``lrs``: (label, outcome, lr)."""
    better = 1.0 if _target(target_acc) is not None else -1.0  # fewer steps, or higher accuracy
    scored = [(s.label, median_outcome(s.runs.get(lr, []), target_acc), lr)
              for s, lr in zip(schemes, lrs) if lr is not None]
    scored = [entry for entry in scored if not math.isnan(entry[1])]
    return min(scored, key=lambda entry: better * entry[1], default=None)


def outcome_name(target_acc: float | None) -> str:
    target = _target(target_acc)
    return f"steps to {cell(target)} train acc" if target is not None else "final test acc"


def reading(schemes: Sequence[LrScheme], shared: float | None, target_acc: float | None, *,
            chance: float | None = None) -> str:
    """Bjorck's question in one sentence: which scheme is best at the shared learning rate, which at each
    scheme's own best, and which trains at the largest learning rate."""
    measure = outcome_name(target_acc)
    at_shared = best_scheme(schemes, [shared] * len(schemes), target_acc)
    at_own = best_scheme(schemes, [best_lr(s, target_acc) for s in schemes], target_acc)
    parts = []
    if at_shared is not None:
        parts.append(f"At the shared learning rate {cell(shared)} the best scheme is `{at_shared[0]}` "
                     f"({measure} {cell(at_shared[1])})")
    if at_own is not None:
        parts.append(f"each at its own best learning rate, `{at_own[0]}` ({cell(at_own[1])} at lr "
                     f"{cell(at_own[2])})")
    largest = {s.label: s.largest_trainable_lr(chance=chance) for s in schemes}
    top = max((lr for lr in largest.values() if lr is not None), default=None)
    if top is not None:
        parts.append("the largest trainable learning rate, " + cell(top) + ", is reached by "
                     + ", ".join(f"`{label}`" for label, lr in largest.items() if lr == top))
    if not parts:
        return "No scheme trains at any learning rate tested."
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def lr_table(schemes: Sequence[LrScheme], target_acc: float | None, *,
             chance: float | None = None) -> tuple[Table, float | None]:
    """One row per scheme: how many seeds train at each learning rate, the largest trainable one, the own best one
    and the outcome there and at the shared learning rate. Returns the table and the shared learning rate."""
    tested = sorted({lr for s in schemes for lr in s.lrs})
    shared = shared_lr(schemes, chance=chance)
    measure = outcome_name(target_acc)
    rows = []
    for scheme in schemes:
        own = best_lr(scheme, target_acc)
        counts = ", ".join(f"{cell(lr)}: {sum(trains(r, chance=chance) for r in runs)}/{len(runs)}"
                           for lr, runs in scheme.runs.items())
        rows.append([scheme.label, counts, trainable_text(scheme, tested, chance=chance), own,
                     median_outcome(scheme.runs[own], target_acc) if own is not None else math.nan,
                     median_outcome(scheme.runs.get(shared, []), target_acc) if shared is not None else math.nan])
    shared_name = f"at the shared lr {cell(shared)}" if shared is not None else "at a shared lr (none trains)"
    table = Table(["scheme", "seeds that train, per lr", "largest trainable lr", "own best lr",
                   f"{measure} at own best lr", f"{measure} {shared_name}"], rows,
                  "Learning rates per scheme (medians over seeds)")
    return table, shared


# -- correlations -----------------------------------------------------------------------------------------------
def spearman_ci(x: Sequence[float], y: Sequence[float], *, groups: Sequence[object] | None = None,
                n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """Spearman ρ of ``x`` and ``y`` with a percentile bootstrap interval at ``level``.

    Resamples the points with replacement, or — given ``groups`` (say the seed of each run) — whole groups, so that
    points that are not independent move together. Pairs with a NaN are left out first; a resample whose ρ is
    undefined (all ties) is skipped. Deterministic given ``seed``. The interval is NaN when fewer than 4 points
    remain, fewer than 2 groups, or ρ itself is undefined (a constant input)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    labels = np.asarray(list(groups) if groups is not None else range(len(xs)), dtype=object)
    keep = ~(np.isnan(xs) | np.isnan(ys))
    xs, ys, labels = xs[keep], ys[keep], labels[keep]
    rho = spearman(xs, ys)
    members = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
    if len(xs) < 4 or len(members) < 2 or not math.isfinite(rho):
        return rho, math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        index = np.concatenate([members[i] for i in rng.integers(len(members), size=len(members))])
        value = spearman(xs[index], ys[index])
        if math.isfinite(value):
            draws.append(value)
    if not draws:
        return rho, math.nan, math.nan
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return rho, float(low), float(high)


@dataclass
class Correlation:
    """ρ with its bootstrap interval over ``n`` runs."""

    label: str
    rho: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def excludes_zero(self) -> bool:
        return self.defined and (self.low > 0 or self.high < 0)

    @property
    def strong(self) -> bool:
        return self.excludes_zero and abs(self.rho) >= STRONG

    def text(self) -> str:
        """"ρ = −0.62, 90% CI [−0.80, −0.35] over 27 runs"."""
        if not math.isfinite(self.rho):
            return f"ρ undefined over {self.n} runs"
        interval = (f"{self.level:.0%} CI [{_signed(self.low)}, {_signed(self.high)}]" if self.defined
                    else "no interval")
        return f"ρ = {_signed(self.rho)}, {interval} over {self.n} runs"


def _signed(value: float) -> str:
    return f"{value:.2f}".replace("-", "−")


def correlate(label: str, runs: Sequence[Run], x: Callable[[Run], float], y: Callable[[Run], float],
              *, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> Correlation:
    """:func:`spearman_ci` of two per-run numbers, resampling runs; ``n`` counts the runs with both."""
    xs, ys = [x(r) for r in runs], [y(r) for r in runs]
    n = sum(not (math.isnan(a) or math.isnan(b)) for a, b in zip(xs, ys))
    return Correlation(label, *spearman_ci(xs, ys, n_boot=n_boot, level=level, seed=seed), n, level)


@dataclass
class LrCorrelations:
    """The numbers the verdict reads: ρ(β, speed) over all runs and within each lr, ρ(β·η/2, speed), ρ(β, lr)."""

    overall: Correlation
    relative: Correlation  # β·η/2: β against the 2/η stability threshold (1 at the edge of stability)
    with_lr: Correlation
    within: dict[float, Correlation]


def lr_correlations(runs: Sequence[Run], speed: Callable[[Run], float], *,
                    smoothness: Callable[[Run], float] | None = None, level: float = LEVEL,
                    n_boot: int = N_BOOT, seed: int = 0) -> LrCorrelations:
    """ρ(smoothness, speed) across all runs and among the runs of each learning rate, ρ of the smoothness relative
    to 2/η with speed, and ρ(smoothness, lr). Runs are resampled one by one (with two or three seeds, resampling
    seeds would leave too few groups for an interval). ``smoothness``: :func:`smoothness_of` by default."""
    smoothness = smoothness or smoothness_of(runs)

    def relative(run: Run) -> float:
        return smoothness(run) * lr_of(run) / 2

    options = {"level": level, "n_boot": n_boot, "seed": seed}
    lrs = sorted({lr_of(r) for r in runs if math.isfinite(lr_of(r))})
    within = {lr: correlate(f"β vs speed at lr {cell(lr)}", [r for r in runs if lr_of(r) == lr], smoothness, speed,
                            **options) for lr in lrs}
    return LrCorrelations(correlate("β vs speed, all runs", runs, smoothness, speed, **options),
                          correlate("β·η/2 vs speed, all runs", runs, relative, speed, **options),
                          correlate("β vs lr", runs, smoothness, lr_of, **options), within)


def strength(rho: float) -> str:
    size = abs(rho)
    return "no" if size < 0.1 else "a weak" if size < 0.3 else "a moderate" if size < STRONG else "a strong"


def verdict(c: LrCorrelations, *, speed_name: str, lower_is_better: bool) -> str:
    """The answer in words, by an explicit rule (``STRONG`` = 0.5, intervals at ``LEVEL``):

    1. **The learning rate sets the smoothness** when |ρ(β, lr)| ≥ STRONG with an interval excluding 0, and every
       learning rate with an interval has its within-lr ρ(β, speed) interval including 0: β moves with η (as at
       the edge of stability, β ≈ 2/η) and, at equal η, does not separate fast schemes from slow ones.
    2. **Smoothing separates schemes at equal learning rate** when at least one learning rate has |ρ(β, speed)| ≥
       STRONG with an interval excluding 0, and all such learning rates agree on the sign.
    3. Otherwise **the data cannot tell**, saying why: no learning rate with enough runs (4) for an interval,
       strong within-lr relations of opposite sign, or intervals too wide for the number of runs.
    (1 and 2 exclude each other: 1 needs every within-lr interval to include 0, 2 needs one to exclude it.)"""
    within = {lr: w for lr, w in c.within.items() if w.defined}
    strong = {lr: w for lr, w in within.items() if w.strong}
    overall = f"Across all runs, β against {speed_name}: {c.overall.text()}."
    with_lr = f" β against the learning rate: {c.with_lr.text()}."
    if c.with_lr.strong and within and not any(w.excludes_zero for w in within.values()):
        widest = max(within.values(), key=lambda w: w.high - w.low)
        return (f"The data support **the learning rate sets the smoothness** (edge of stability) rather than "
                f"smoothing explaining speed: β has {strength(c.with_lr.rho)} rank relation with η "
                f"({c.with_lr.text()}), while at equal learning rate β does not separate fast schemes from slow "
                f"ones (every within-lr interval includes 0; widest at lr {cell(_key_of(within, widest))}: "
                f"{widest.text()}). Relative to the 2/η threshold, β·η/2 against {speed_name}: "
                f"{c.relative.text()}. {overall}")
    if strong and len({np.sign(w.rho) for w in strong.values()}) == 1:
        rho = next(iter(strong.values())).rho
        smoother_better = (rho > 0) == lower_is_better  # ρ(β, outcome): low β with a low (or high) outcome
        which = "; ".join(f"lr {cell(lr)}: {w.text()}" for lr, w in strong.items())
        return (f"The data support **smoothing separates schemes at equal learning rate**: at the same η, "
                f"smoother runs (lower β) did {'better' if smoother_better else 'worse'} on {speed_name} "
                f"({which}). {overall}{with_lr}")
    if not within:
        why = ("no learning rate has at least 4 runs with both β and the outcome, so schemes cannot be compared "
               "at equal learning rate")
    elif strong:
        why = "the within-lr relations are strong but of opposite sign (" + "; ".join(
            f"lr {cell(lr)}: {w.text()}" for lr, w in strong.items()) + ")"
    else:
        widest = max(within.values(), key=lambda w: w.high - w.low)
        why = (f"at equal learning rate the intervals are wide for the number of runs (widest at lr "
               f"{cell(_key_of(within, widest))}: {widest.text()}, width {widest.high - widest.low:.2f})")
        if not c.with_lr.strong:
            why += f", and β has {strength(c.with_lr.rho)} relation with η ({c.with_lr.text()})"
            with_lr = ""  # said already
        else:
            why += ", although β follows η, some within-lr interval excludes 0 without a strong ρ"
    return f"The data **cannot tell** whether smoothing or the learning rate explains speed: {why}. {overall}{with_lr}"


def _key_of(mapping: dict[float, Correlation], value: Correlation) -> float:
    return next(k for k, v in mapping.items() if v is value)


# -- the section ------------------------------------------------------------------------------------------------
def section(doc: Document, runs: Sequence[Run], target_acc: float | None = None, *,
            chance: float | None = None, smoothness: Callable[[Run], float] | None = None) -> bool:
    """Add "Learning rate or normalization?" to ``doc`` when the runs use at least 2 learning rates; returns
    whether it did. ``target_acc`` (the report's speed target) makes speed the steps to it, else the final test
    accuracy; ``chance`` (1/classes; by default the runs' own, read from their checkpoints' headers) adds the
    accuracy check to "trains"."""
    lrs = {lr_of(r) for r in runs if math.isfinite(lr_of(r))}
    if len(lrs) < 2:
        return False
    smoothness = smoothness or smoothness_of(runs)
    if chance is None:  # the runs' own, when those that know it agree (their checkpoints are there)
        chances = {known for run in runs if (known := run.chance()) is not None}
        chance = chances.pop() if len(chances) == 1 else None
    measure = ranking.smoothness_of(runs)
    named = f"β = {measure.label}, the smoothness measure of the {measure.probe} probe" if measure else "β"
    target = _target(target_acc)
    schemes = lr_schemes(runs)
    table, shared = lr_table(schemes, target, chance=chance)
    doc.heading("Learning rate or normalization?")
    doc.paragraph(
        "Does a normalization help at equal learning rate, or by letting the network train at a larger one "
        f"(Bjorck et al. 2018)? A run *trains* if it did not diverge and its last training loss is below "
        f"{TRAIN_LOSS_FRACTION:.0%} of its first" + (f" and its final test accuracy beats chance by "
                                                     f"{CHANCE_MARGIN:.2f}" if chance is not None else "")
        + "; a scheme trains at a learning rate when most of its seeds do. The shared learning rate is the one "
        "at which the most schemes train (ties: the smaller); the own best one has the best median outcome. "
        "A diverged run never reaches the target (accuracy 0).")
    doc.table(table)
    doc.paragraph(reading(schemes, shared, target, chance=chance))
    speed_name = outcome_name(target)
    if not any(math.isfinite(smoothness(r)) for r in runs):
        doc.paragraph("No run has a smoothness value (no probe of these runs declares a smoothness measure, or "
                      "none measured it), so smoothness cannot be set against speed and the learning rate.")
        return True
    correlations = lr_correlations(runs, lambda r: outcome(r, target), smoothness=smoothness)
    rows = [[c.label, c.rho, c.low, c.high, c.n] for c in
            (correlations.overall, correlations.relative, correlations.with_lr, *correlations.within.values())]
    doc.table(Table(["comparison", "Spearman ρ", f"{LEVEL:.0%} CI low", "high", "runs"], rows,
                    f"Smoothness ({named}) against {speed_name} and the learning rate, bootstrap over "
                    f"runs ({N_BOOT} resamples); – where fewer than 4 runs have both numbers"))
    doc.paragraph(verdict(correlations, speed_name=speed_name, lower_is_better=target is not None))
    return True
