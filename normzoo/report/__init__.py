"""``normzoo report``: from a run folder or a sweep folder to ``report.md``, ``report.html`` and PNG figures.

The report answers one question — does the smoothing seen with BatchNorm come with faster optimization across
normalization schemes? — by ranking schemes by smoothness against speed and accuracy, at equal steps and at
matched training loss, and shows every probe's figures and summaries for every scheme. What a probe contributes
(its smoothness measure, its columns, figures and summaries) its own report declares
(:mod:`normzoo.probe_report`); this module names no probe.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normzoo.analysis import Run, find_runs, varying_fields
from normzoo.io import atomic_write_bytes, atomic_write_text
from normzoo.probe_report import ProbeReport, ReportFigure, report_for
from normzoo.report import figures as fig
from normzoo.report import learning_rates
from normzoo.report.render import Document, Figure, Table, cell
from normzoo.report.schemes import (PLATEAU_FRACTION, Measure, Scheme, by_setting, compute, correlations,
                                    declared_columns, probes_in, short_value)

FIGURES_DIR = "report-figures"


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    figures: list[Path]


def write_report(path: str | Path, *, target_acc: float | None = None, title: str | None = None) -> ReportFiles:
    """Write ``report.md``, ``report.html`` and ``report-figures/*.png`` into ``path`` and return their paths."""
    root = Path(path)
    runs = find_runs(root)
    # Sweep runs that failed before writing anything a report could read.
    unstarted = sorted(p.parent.name for p in root.glob("*/sweep-run.json") if not (p.parent / "config.json").exists())
    document = build(runs, target_acc=target_acc, title=title or f"normzoo report: {root.resolve().name}",
                     unstarted=unstarted)
    figures_dir = root / FIGURES_DIR
    figures_dir.mkdir(exist_ok=True)
    pngs = [atomic_write_bytes(figures_dir / f"{f.name}.png", f.png) for f in document.figures]
    for stale in set(figures_dir.glob("*.png")) - set(pngs):  # figures of an earlier report of this folder
        stale.unlink()
    markdown = atomic_write_text(root / "report.md", document.markdown(FIGURES_DIR))
    page = atomic_write_text(root / "report.html", document.html())
    return ReportFiles(markdown, page, pngs)


def mean_spread(scheme: Scheme, key: str, digits: int = 3) -> str:
    mean, spread = scheme.mean(key), scheme.spread(key)
    if not math.isfinite(mean):
        return cell(mean)
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if math.isfinite(spread) else "")


def build(runs: list[Run], *, target_acc: float | None = None, title: str,
          unstarted: Sequence[str] = ()) -> Document:
    schemes, targets = compute(runs, target_acc)
    doc = Document(title)
    overview(doc, runs, schemes)
    if unstarted:
        doc.paragraph("Not in this report, failed before training started (see their run.log): "
                      + ", ".join(f"`{n}`" for n in unstarted) + ".")
    answer(doc, schemes, targets)
    learning_rates.section(doc, runs, targets["target_acc"])  # only when the runs use 2+ learning rates
    figures(doc, schemes)
    all_runs(doc, runs)
    return doc


def overview(doc: Document, runs: list[Run], schemes: list[Scheme]) -> None:
    states = Counter(run.status for run in runs)
    varying = varying_fields(runs)
    shared = {k: short_value(k, runs[0].config.get(k)) for k in
              ("backbone", "dataset", "steps", "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay",
               "schedule", "augment") if k not in varying and runs[0].config.get(k) is not None}
    seeds = sorted({run.seed for run in runs})
    doc.paragraph(f"{len(runs)} runs ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}) in "
                  f"{len(schemes)} schemes × {len(seeds)} seed(s) ({', '.join(map(str, seeds))}). Varying: "
                  f"{', '.join(varying) or 'nothing but the seed'}. Shared: "
                  + ", ".join(f"{k} `{v}`" for k, v in shared.items()) + ".")


def answer(doc: Document, schemes: list[Scheme], targets: dict[str, float]) -> None:
    doc.heading("Does smoothness go with faster optimization?")
    groups = by_setting(schemes)
    measure = schemes[0].measure if schemes else None
    runs = [run for scheme in schemes for run in scheme.runs]
    if measure is not None:
        doc.paragraph(ranking_explanation(measure, targets, several_settings=len(groups) > 1))
    ranked_by = measure.column if measure else None
    # A declared column no scheme has a value for (say, of a view the probe was not asked for) is left out.
    columns = [column for _, column in declared_columns(runs) if column != ranked_by
               and any(math.isfinite(scheme.mean(column.key)) for scheme in schemes)]
    matched = measure is not None and measure.column.per_record is not None
    correlated: list[tuple[str, dict[str, Any]]] = []  # (setting, correlation row)
    for setting, group in groups.items():
        level = group[0].context["matched_loss"]
        ranked = sorted(group, key=lambda s: (not math.isfinite(s.mean("smoothness")), s.mean("smoothness")))
        rows = [[rank, scheme.label, ", ".join(f"{n} {s}" for s, n in Counter(r.status for r in scheme.runs).items()),
                 mean_spread(scheme, "train_acc"), mean_spread(scheme, "test_acc"), scheme.mean("steps_to_target"),
                 *([mean_spread(scheme, "smoothness", 2)] if measure else []),
                 *([mean_spread(scheme, "smoothness_matched", 2)] if matched else []),
                 *[scheme.mean(column.key) for column in columns]]
                for rank, scheme in enumerate(ranked, 1)]
        header = ["rank", "scheme", "runs", "final train acc", "final test acc",
                  f"steps to {cell(targets['target_acc'])} train acc",
                  *([measure.label] if measure else []),
                  *([f"{measure.symbol} at loss {cell(level)}"] if matched else []),
                  *[column.label for column in columns]]
        doc.table(Table(header, rows, f"Smoothness against speed{', ' + setting if setting else ''}"))
        correlated += [(setting or "all", row) for row in correlations(group)]
    if correlated:
        doc.table(Table(["setting", "comparison", "Spearman ρ (mean over seeds)", "min", "max", "seeds", "schemes"],
                        [[setting, r["comparison"], r["rho_mean"], r["rho_min"], r["rho_max"], r["seeds"],
                          r["schemes"]] for setting, r in correlated],
                        "Rank correlation across the schemes of one setting, one per seed; ρ > 0: smoother schemes "
                        "are faster (or more accurate), ρ < 0: the opposite; – where fewer than 3 schemes have both "
                        "numbers"))
    notes = [reading(setting, r) for setting, r in correlated
             if r["x"] in ("smoothness", "smoothness_matched") and r["y"] == "steps_to_target"]
    for group in groups.values():
        notes += findings(group, group[0].context["matched_loss"])
    if measure is None:
        notes.append(no_smoothness_note())
    doc.bullets([n for n in notes if n])


def ranking_explanation(measure: Measure, targets: dict[str, float], *, several_settings: bool) -> str:
    matched = (f" {measure.symbol} at matched loss is {measure.symbol} where the probe-batch training loss first "
               "falls to the lowest loss that every scheme of the same setting that trained reaches."
               if measure.column.per_record else "")
    return (f"Schemes ranked by smoothness (lower is smoother): {measure.column.description or measure.label}, "
            f"from probe `{measure.probe}`. Speed is the first logged step at which the training accuracy "
            f"reaches {cell(targets['target_acc'])}.{matched} Values are mean ± std over seeds."
            + (f" Schemes are ranked and correlated within one setting: {measure.symbol} need not be comparable "
               "across settings such as learning rates." if several_settings else ""))


def no_smoothness_note() -> str:
    """Which installed probes would give the ranking its smoothness measure."""
    from normzoo.plugins import registry

    offering = [entry.name for entry in registry("probes")
                if any(column.smoothness for column in report_for(entry.name).columns)]
    return ("No run has records of a probe whose report declares a smoothness measure, so there is no smoothness to "
            "rank" + (": add one of " + ", ".join(f"`--probe {name}:every=100`" for name in offering)
                      + " to the runs." if offering else "."))


def reading(setting: str, correlation: dict[str, Any]) -> str:
    """One sentence for a correlation row: its sign and size in words."""
    comparison, rho, low, high = (correlation[k] for k in ("comparison", "rho_mean", "rho_min", "rho_max"))
    if not math.isfinite(rho):
        return ""
    if low < 0 < high:
        verdict = "the seeds disagree on the sign: no consistent relation"
    elif abs(rho) < 0.3:
        verdict = "no clear relation between smoothness and speed"
    else:
        verdict = "smoother schemes reached the target sooner" if rho > 0 else \
            "smoother schemes reached the target later"
    where = "" if setting == "all" else f"At {setting}, "
    return (f"{where}{comparison.split(' vs ')[0]}: ρ = {rho:+.2f} (seeds {low:+.2f} to {high:+.2f}), "
            f"{verdict}.")


def findings(schemes: list[Scheme], level: float) -> list[str]:
    """Plain statements about what the table shows, including the equal-steps trap."""
    notes = []
    trained = [s for s in schemes if not s.plateaued]
    measure = schemes[0].measure if schemes else None
    for scheme in schemes:
        if not scheme.plateaued:
            continue
        smoothness = scheme.mean("smoothness")
        smoother_than = [s.label for s in trained if math.isfinite(smoothness) and smoothness < s.mean("smoothness")]
        text = (f"`{scheme.label}` never left its initial plateau (final training loss ≥ "
                f"{PLATEAU_FRACTION:.0%} of its first).")
        if measure and smoother_than:
            text += (f" At equal steps its {measure.label} ({smoothness:.3g}) is lower than that of "
                     f"{', '.join(f'`{s}`' for s in smoother_than)}, but that measures the flat region around its "
                     "initialization, not smoothness along a training trajectory.")
        if measure and measure.column.per_record:
            reached = sum(math.isfinite(v) for v in scheme.per_seed("smoothness_matched").values())
            text += (f" It reaches the matched loss {cell(level)} in {reached} of {len(scheme.runs)} runs"
                     + (", so it has no matched-loss value." if not reached else "."))
        notes.append(text)
    for scheme in trained if measure else []:
        equal, at_loss = scheme.mean("smoothness"), scheme.mean("smoothness_matched")
        if math.isfinite(equal) and math.isfinite(at_loss) and max(equal, at_loss) > 2 * min(equal, at_loss):
            notes.append(f"`{scheme.label}`: {measure.label} {equal:.3g} over training but {at_loss:.3g} at loss "
                         f"{cell(level)}: equal steps and equal progress disagree for this scheme.")
    for scheme in schemes:
        diverged = [run.path.name for run in scheme.runs if run.status == "diverged"]
        if diverged:
            notes.append(f"`{scheme.label}` diverged in {len(diverged)} of {len(scheme.runs)} runs "
                         f"({', '.join(diverged)}); its curves stop there.")
    return notes


def figures(doc: Document, schemes: list[Scheme]) -> None:
    """The training figures, then every probe's section (its report's figures and its table of summaries), in the
    order the runs list their probes; a figure whose records are missing is named at the end."""
    plots = fig.Plots(fig.Palette(schemes))
    missing = [figure.name for figure in TRAINING_FIGURES if not draw(doc, figure, schemes, plots)]
    for probe in probes_in([run for scheme in schemes for run in scheme.runs]):
        report = report_for(probe)
        drawn = [figure.name for figure in report.figures() if draw(doc, figure, schemes, plots)]
        missing += [figure.name for figure in report.figures() if figure.name not in drawn]
        summary_table(doc, report, schemes, with_heading=not drawn)
    if missing:
        doc.paragraph("Not shown, no records: " + ", ".join(f"`{m}`" for m in missing) + ".")


TRAINING_FIGURES = [
    ReportFigure("training", "Training",
                 "Training loss (log), training accuracy and test accuracy over steps, mean over seeds with the "
                 "min–max range shaded (Santurkar et al. Fig. 1).",
                 lambda schemes, plots: fig.training(schemes, plots.palette), per_setting=False),
    ReportFigure("learning-rate", "Accuracy against learning rate",
                 "Final training and test accuracy (mean over seeds) against the learning rate, per norm (Bjorck et "
                 "al. 2018: normalization makes large learning rates usable).",
                 lambda schemes, plots: fig.by_learning_rate(schemes, plots.palette), per_setting=False),
]


def draw(doc: Document, figure: ReportFigure, schemes: list[Scheme], plots: fig.Plots) -> bool:
    """Add ``figure`` under its heading, once per setting when it is ``per_setting`` and settings differ; False
    when there was nothing to draw."""
    groups = by_setting(schemes)
    parts = list(groups.items()) if figure.per_setting and len(groups) > 1 else [("", schemes)]
    drawn = [(setting, image) for setting, group in parts if (image := figure.draw(group, plots)) is not None]
    if not drawn:
        return False
    doc.heading(figure.heading)
    for setting, image in drawn:
        slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in setting)
        doc.figure(Figure(f"{figure.name}-{slug}" if setting else figure.name,
                          f"{setting}: {figure.caption}" if setting else figure.caption, fig.png_bytes(image)))
    return True


def summary_table(doc: Document, report: ProbeReport, schemes: list[Scheme], *, with_heading: bool) -> None:
    """The probe's summary values per scheme (mean over seeds of each run's value), when any is a number."""
    if report.table is not None:
        keys = list(report.table)
    else:
        summaries = [report.summarize(run.probes[report.probe], run.config) for scheme in schemes
                     for run in scheme.runs if report.probe in run.probes]
        keys = list(dict.fromkeys(key for summary in summaries for key in summary))
    keys = [key for key in keys if any(math.isfinite(scheme.mean(key)) for scheme in schemes)]
    if not keys:
        return
    rows = [[scheme.label, *[scheme.mean(key) for key in keys]] for scheme in schemes]
    if with_heading:
        doc.heading(report.heading)
    doc.table(Table(["scheme", *[report.label(key) for key in keys]], rows,
                    f"`{report.probe}`: each run's summary (median over training unless named otherwise), mean over "
                    "seeds; sweep.csv has them per run"))


def all_runs(doc: Document, runs: list[Run]) -> None:
    doc.heading("All runs")
    rows = [[run.path.name, short_value("norm", run.config.get("norm")), run.config.get("lr"), run.seed, run.status,
             run.summary.get("step"), run.final("train_loss"), run.final("train_acc"), run.final("test_acc"),
             run.final("train_time_s")] for run in runs]
    doc.table(Table(["run", "norm", "lr", "seed", "status", "steps", "train loss", "train acc", "test acc",
                     "train time (s)"], rows))
