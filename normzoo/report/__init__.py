"""``normzoo report``: from a run folder or a sweep folder to ``report.md``, ``report.html`` and PNG figures.

The report answers one question — does the smoothing seen with BatchNorm come with faster optimization across
normalization schemes? — by ranking schemes by smoothness against speed and accuracy, at equal steps and at
matched training loss, and shows the paper's figures for every scheme.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normzoo.analysis import Run, find_runs, varying_fields
from normzoo.io import atomic_write_bytes, atomic_write_text
from normzoo.report import figures as fig
from normzoo.report import learning_rates
from normzoo.report.render import Document, Figure, Table, cell
from normzoo.report.schemes import PLATEAU_FRACTION, Scheme, by_setting, compute, correlations, short_value

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
    doc.paragraph(
        "Schemes ranked by smoothness: the median effective β-smoothness over training (lower is smoother; "
        "Santurkar et al. §3.2). Speed is the first logged step at which the training accuracy reaches "
        f"{cell(targets['target_acc'])}; β at matched loss is β where the probe-batch training loss first falls "
        "to the lowest loss that every scheme of the same setting that trained reaches. Values are mean ± std "
        "over seeds." + (" Schemes are ranked and correlated within one setting: the landscape probe's step "
                         "sizes scale with the learning rate, so β is not comparable across learning rates."
                         if len(groups) > 1 else ""))
    correlation_rows = []
    for setting, group in groups.items():
        level = group[0].context["matched_loss"]
        ranked = sorted(group, key=lambda s: (not math.isfinite(s.mean("beta")), s.mean("beta")))
        rows = [[rank, scheme.label, ", ".join(f"{n} {s}" for s, n in Counter(r.status for r in scheme.runs).items()),
                 mean_spread(scheme, "train_acc"), mean_spread(scheme, "test_acc"), scheme.mean("steps_to_target"),
                 mean_spread(scheme, "beta", 2), scheme.mean("loss_band"), scheme.mean("grad_band"),
                 mean_spread(scheme, "beta_matched", 2), scheme.mean("hessian")]
                for rank, scheme in enumerate(ranked, 1)]
        doc.table(Table(["rank", "scheme", "runs", "final train acc", "final test acc",
                         f"steps to {cell(targets['target_acc'])} train acc", "median β", "loss band",
                         "gradient band", f"β at loss {cell(level)}", "Hessian λ_max"], rows,
                        f"Smoothness against speed{', ' + setting if setting else ''}"))
        correlation_rows += [[setting or "all", r["comparison"], r["rho_mean"], r["rho_min"], r["rho_max"],
                              r["seeds"], r["schemes"]] for r in correlations(group)]
    doc.table(Table(["setting", "comparison", "Spearman ρ (mean over seeds)", "min", "max", "seeds", "schemes"],
                    correlation_rows,
                    "Rank correlation across the schemes of one setting, one per seed; ρ > 0: smoother schemes are "
                    "faster (or more accurate), ρ < 0: the opposite; – where fewer than 3 schemes have both numbers"))
    notes = [reading(row) for row in correlation_rows if row[1].startswith(("median β (equal steps) vs steps",
                                                                           "β at matched loss vs steps"))]
    for group in groups.values():
        notes += findings(group, group[0].context["matched_loss"])
    if not any(run.probes.get("landscape") for s in schemes for run in s.runs):
        notes.append("No run has landscape records, so there is no smoothness to rank: add "
                     "`--probe landscape:every=100` to the runs.")
    doc.bullets([n for n in notes if n])


def reading(row: list[Any]) -> str:
    """One sentence for a correlation row: its sign and size in words."""
    setting, comparison, rho, low, high = row[:5]
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
    for scheme in schemes:
        if not scheme.plateaued:
            continue
        beta = scheme.mean("beta")
        smoother_than = [s.label for s in trained if math.isfinite(beta) and beta < s.mean("beta")]
        text = (f"`{scheme.label}` never left its initial plateau (final training loss ≥ "
                f"{PLATEAU_FRACTION:.0%} of its first).")
        if smoother_than:
            text += (f" At equal steps its median β ({beta:.3g}) is lower than that of "
                     f"{', '.join(f'`{s}`' for s in smoother_than)}, but that measures the flat region around its "
                     "initialization, not a smoother landscape along a training trajectory.")
        reached = sum(math.isfinite(v) for v in scheme.per_seed("beta_matched").values())
        text += (f" It reaches the matched loss {cell(level)} in {reached} of {len(scheme.runs)} runs"
                 + (", so it has no matched-loss value." if not reached else "."))
        notes.append(text)
    for scheme in trained:
        equal, at_loss = scheme.mean("beta"), scheme.mean("beta_matched")
        if math.isfinite(equal) and math.isfinite(at_loss) and max(equal, at_loss) > 2 * min(equal, at_loss):
            notes.append(f"`{scheme.label}`: median β {equal:.3g} over training but {at_loss:.3g} at loss "
                         f"{cell(level)}: equal steps and equal progress disagree for this scheme.")
    for scheme in schemes:
        diverged = [run.path.name for run in scheme.runs if run.status == "diverged"]
        if diverged:
            notes.append(f"`{scheme.label}` diverged in {len(diverged)} of {len(scheme.runs)} runs "
                         f"({', '.join(diverged)}); its curves stop there.")
    return notes


def figures(doc: Document, schemes: list[Scheme]) -> None:
    """Every figure whose records exist; the lr-dependent ones (marked True) once per setting."""
    palette = fig.Palette(schemes)
    entries: list[tuple[str, str, str, Callable[[list[Scheme]], Any], bool]] = [
        ("Training", "training", "Training loss (log), training accuracy and test accuracy over steps, mean over "
         "seeds with the min–max range shaded (Santurkar et al. Fig. 1).", lambda g: fig.training(g, palette), False),
        ("Accuracy against learning rate", "learning-rate",
         "Final training and test accuracy (mean over seeds) against the learning rate, per norm (Bjorck et al. "
         "2018: normalization makes large learning rates usable).", lambda g: fig.by_learning_rate(g, palette), False),
        ("Loss landscape along the gradient", "landscape",
         "Loss variation and gradient predictiveness: the range of L(θ − ηg) and of ‖∇L(θ) − ∇L(θ − ηg)‖ over the "
         "probe's step sizes η, and the effective β-smoothness (Santurkar et al. Fig. 4, 12, 13).",
         lambda g: fig.landscape(g, palette), True),
        ("Equal steps or equal progress?", "matched",
         "Left: the training loss at each probe (grey: the matched loss); right: β against that loss. A scheme "
         "still on its initial plateau sits at the right with a small β: compare schemes at the same loss, not "
         "the same step.", lambda g: fig.matched(g, palette, g[0].context["matched_loss"]), True),
        ("Internal covariate shift", "ics",
         "‖G − G′‖₂ and cos(G, G′) per tracked layer, median over training and seeds (Santurkar et al. Fig. 3, "
         "Definition 2.1).",
         lambda g: fig.per_layer(g, palette, "ics", [("l2", "ℓ2 difference ‖G − G′‖", "log"),
                                                     ("cos", "cosine angle cos(G, G′)", "linear")]), True),
        ("Activation drift", "activations",
         "How far the per-channel mean and variance of each norm layer's input move between measurements, "
         "averaged over layers (Santurkar et al. Fig. 2/8).", lambda g: fig.activations(g, palette), True),
        ("Hessian", "hessian", "Top Hessian eigenvalue (power iteration) and trace (Hutchinson) over training.",
         lambda g: fig.hessian(g, palette), True),
        ("Gradients through depth", "grad-norms", "Per-layer gradient norm at the last probe (Bjorck et al. 2018).",
         lambda g: fig.per_layer(g, palette, "grad-norms", [("grad_norm", "gradient norm per layer", "log")],
                                 last_only=True), False),
        ("Scale through depth", "depth-scaling",
         "Activation RMS and activation-gradient norm per layer at the last probe (Bjorck et al. 2018: without "
         "normalization they grow or shrink geometrically with depth).",
         lambda g: fig.per_layer(g, palette, "depth-scaling", [("act_rms", "activation RMS", "log"),
                                                               ("act_grad_norm", "activation-gradient norm", "log")],
                                 last_only=True), False),
        ("One step along the gradient", "step-loss",
         "Loss after one step of size η along −g relative to the loss before, at the last probe "
         "(Bjorck et al. 2018): where the ratio stays below 1 the scheme tolerates that learning rate.",
         lambda g: fig.step_loss(g, palette), False),
    ]
    groups = by_setting(schemes)
    missing = []
    for heading, name, caption, draw, per_setting in entries:
        parts = list(groups.items()) if per_setting and len(groups) > 1 else [("", schemes)]
        drawn = [(setting, figure) for setting, group in parts if (figure := draw(group)) is not None]
        if not drawn:
            missing.append(name)
            continue
        doc.heading(heading)
        for setting, figure in drawn:
            slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in setting)
            doc.figure(Figure(f"{name}-{slug}" if setting else name,
                              f"{setting}: {caption}" if setting else caption, fig.png_bytes(figure)))
    if missing:
        doc.paragraph("Not shown, no records: " + ", ".join(f"`{m}`" for m in missing) + ".")


def all_runs(doc: Document, runs: list[Run]) -> None:
    doc.heading("All runs")
    rows = [[run.path.name, short_value("norm", run.config.get("norm")), run.config.get("lr"), run.seed, run.status,
             run.summary.get("step"), run.final("train_loss"), run.final("train_acc"), run.final("test_acc"),
             run.final("train_time_s")] for run in runs]
    doc.table(Table(["run", "norm", "lr", "seed", "status", "steps", "train loss", "train acc", "test acc",
                     "train time (s)"], rows))
