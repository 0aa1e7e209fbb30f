"""Probes own their reports: the generic section of a probe that declares nothing (or is not installed), a probe's
own ProbeReport (its figure, table, summary and the ranking's smoothness measure), and a core that names no probe.

The run folders are written by hand (config.json, metrics.jsonl, summary.csv): what a report reads, no training.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import pytest

from normzoo import hookimpl
from normzoo.analysis import Run, probe_summaries
from normzoo.plugins import registry
from normzoo.probe_report import ProbeReport, report_for
from normzoo.report import write_report

ROOT = Path(__file__).resolve().parent.parent
CORE_REPORT_SOURCES = [ROOT / "normzoo" / "analysis.py", ROOT / "normzoo" / "probe_report.py",
                       *sorted((ROOT / "normzoo" / "report").glob("*.py"))]

# A probe with no report declaration and one with its own report, as a third-party package would write them.
PLUGIN = """
    import math

    from normzoo import hookimpl
    from normzoo.probe import Probe
    from normzoo.probe_report import Column, ProbeReport, ReportFigure


    class ScoreProbe(Probe):
        name = "nz-score"

        def measure(self, ctx):
            return {"score": 1.0}


    class WobbleProbe(Probe):
        name = "nz-wobble"
        report = "nz_test_probe_reports:WobbleReport"

        def measure(self, ctx):
            return {"wobble": 1.0, "loss": 1.0}


    class WobbleReport(ProbeReport):
        columns = (Column("nz_wobble_wobble_median", "median wobble", smoothness=True, per_record="wobble",
                          symbol="wobble"),)

        @property
        def heading(self):
            return "Wobble over training"

        def summarize(self, records, config):
            peak = max((r["wobble"] for r in records), default=math.nan)
            return super().summarize(records, config) | {"nz_wobble_wobble_peak": peak}

        def figures(self):
            return [ReportFigure("wobble-figure", self.heading, "The wobble, per scheme.",
                                 lambda schemes, plots: plots.over_steps(
                                     schemes, "nz-wobble", [("wobble", "wobble", "linear", "wobble")]))]


    @hookimpl
    def register_probes(register):
        for probe in (ScoreProbe, WobbleProbe):
            register(probe.name, probe, summary="a test probe")
"""


@pytest.fixture
def third_party_probes(site, fresh_plugins):
    (site / "nz_test_probe_reports.py").write_text(textwrap.dedent(PLUGIN))
    import nz_test_probe_reports

    fresh_plugins.register(nz_test_probe_reports, name="nz-test-probe-reports")
    return fresh_plugins


def write_run(root: Path, name: str, norm: str, probes: dict[str, list[dict]], *, backbone: str = "vgg11",
              final_acc: float = 0.5) -> Path:
    """A finished run folder with training, one evaluation and the given probe records."""
    path = root / name
    path.mkdir(parents=True)
    config = {"backbone": backbone, "norm": norm, "dataset": "fashion-mnist-mini", "steps": 20, "lr": 0.1,
              "momentum": 0.9, "optimizer": "sgd", "seed": 0, "probes": [f"{p}:every=10" for p in probes]}
    (path / "config.json").write_text(json.dumps(config))
    records = [{"type": "train", "step": s, "loss": 2.3 - s * 0.05, "acc": final_acc * s / 20} for s in (0, 10, 20)]
    records.append({"type": "eval", "step": 20, "loss": 1.0, "acc": final_acc})
    records += [{"type": "probe", "probe": probe, "step": r["step"], "batch_size": 8, **r}
                for probe, rows in probes.items() for r in rows]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "summary.csv").write_text(f"status,step,train_loss,train_acc,test_acc\nfinished,20,1.3,{final_acc},"
                                      f"{final_acc}\n")
    return path


def probe_rows(field: str, values: list[float], **extra: float) -> list[dict]:
    return [{"step": 10 * i, field: v, **extra} for i, v in enumerate(values)]


def test_a_probe_without_a_report_gets_a_generic_section(third_party_probes, tmp_path):
    for norm, score in (("bn", 1.0), ("none", 3.0)):
        write_run(tmp_path, norm, norm, {"nz-score": probe_rows("score", [score, score + 1]),
                                         "nz-not-installed": probe_rows("value", [score * 10])})
    markdown = write_report(tmp_path).markdown.read_text()
    for probe in ("nz-score", "nz-not-installed"):
        assert f"## Probe `{probe}`" in markdown
        assert f"](report-figures/{probe}.png)" in markdown and (tmp_path / "report-figures" / f"{probe}.png").exists()
    table = markdown.split("*`nz-score`: each run's summary")[1].split("\n\n")[1]
    assert "| scheme | score |" in table and "| bn | 1.5 |" in table and "| none | 3.5 |" in table
    assert "there is no smoothness to rank" in markdown  # neither declares a smoothness measure


def test_a_probe_report_gives_its_figure_table_summary_and_smoothness_measure(third_party_probes, tmp_path):
    for norm, wobble in (("bn", 1.0), ("gn", 2.0), ("none", 4.0)):
        write_run(tmp_path, norm, norm, {"nz-wobble": probe_rows("wobble", [wobble, wobble * 3], loss=1.0)})
    run_summary = probe_summaries({"nz-wobble": probe_rows("wobble", [1.0, 3.0])}, {})
    assert run_summary == {"nz_wobble_wobble_median": 2.0, "nz_wobble_wobble_peak": 3.0}
    markdown = write_report(tmp_path).markdown.read_text()
    assert "## Wobble over training" in markdown and "](report-figures/wobble-figure.png)" in markdown
    assert "from probe `nz-wobble`" in markdown
    ranking = markdown.split("*Smoothness against speed*")[1].split("\n\n")[1].splitlines()
    assert "median wobble" in ranking[0] and "wobble at loss" in ranking[0]
    assert [row.split(" | ")[1] for row in ranking[2:]] == ["bn", "gn:32", "none"]  # ranked by the declared measure
    assert "| wobble (equal steps) vs steps to target accuracy |" not in markdown  # the label is the column's
    assert "| median wobble (equal steps) vs steps to target accuracy |" in markdown
    assert "| scheme | loss | wobble | wobble_peak |\n|---|---|---|---|\n| bn | 1 | 2 | 3 |" in markdown


def test_report_for_falls_back_to_the_generic_report(third_party_probes):
    assert type(report_for("nz-score")) is ProbeReport  # registered, declares nothing
    assert type(report_for("nz-never-registered")) is ProbeReport
    assert type(report_for("nz-wobble")).__name__ == "WobbleReport"
    assert registry("probes").get("nz-wobble").report == "nz_test_probe_reports:WobbleReport"


def test_the_header_keeps_a_backbones_parameters(tmp_path):
    for norm in ("bn", "none"):
        write_run(tmp_path, norm, norm, {}, backbone="vgg11,width=0.25")
    assert "Shared: backbone `vgg11,width=0.25`" in write_report(tmp_path).markdown.read_text()


def test_a_single_evaluation_point_is_drawn_with_a_marker():
    from normzoo.report.figures import Palette, Plots, plot_over_seeds, plt
    from normzoo.report.schemes import Scheme

    run = Run(Path("/x/run"), {"norm": "bn", "seed": 0}, {"status": "finished"})
    run.evals = [{"step": 20, "acc": 0.4}]
    scheme = Scheme("bn", "bn", [run], {"norm": "bn"})
    fig, axes = Plots.grid(1)
    assert plot_over_seeds(axes[0], scheme, Palette([scheme]), lambda r: r.evals, "acc")
    assert axes[0].lines[0].get_marker() == "o"
    plt.close(fig)


def test_shipped_reports_summaries_and_the_stability_threshold():
    landscape = probe_rows("beta", [4.0, 6.0, 8.0], loss_min=1.0, loss_max=1.5, grad_dist_min=0.5, grad_dist_max=2.5)
    sgd = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}
    out = probe_summaries({"landscape": landscape}, sgd)
    assert out["landscape_beta_median"] == 6.0
    assert out["landscape_loss_band_median"] == pytest.approx(0.5)
    assert out["landscape_beta_relative_median"] == pytest.approx(6.0 * 0.1 / (2 + 2 * 0.9))
    assert probe_summaries({"landscape": landscape}, sgd | {"momentum": 0.0})[
        "landscape_beta_relative_median"] == pytest.approx(6.0 * 0.1 / 2)
    assert math.isnan(probe_summaries({"landscape": landscape}, sgd | {"optimizer": "adam"})[
        "landscape_beta_relative_median"])
    sharpness = probe_rows("eigenvalue", [10.0, 30.0], threshold=20.0)
    for record in sharpness:
        record["relative"] = record["eigenvalue"] / record["threshold"]
    assert probe_summaries({"sharpness": sharpness})["sharpness_relative_median"] == pytest.approx(1.0)
    effective = [{"step": 0, "effective_lr": [0.1, -0.3], "angular_update": [0.01, 0.03], "weight_norm": [1.0, 2.0]}]
    assert probe_summaries({"effective-lr": effective})["effective_lr_effective_lr_median"] == pytest.approx(0.2)


def test_sharpness_figure_draws_a_threshold_per_learning_rate(tmp_path):
    for lr_name, threshold in (("a", 38.0), ("b", 3.8)):
        path = write_run(tmp_path, f"bn-{lr_name}", "bn",
                         {"sharpness": probe_rows("eigenvalue", [5.0, 9.0], threshold=threshold, relative=0.5)})
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | {"lr": 3.8 / threshold}))
    markdown = write_report(tmp_path).markdown.read_text()
    assert "## Sharpness and the edge of stability" in markdown and "](report-figures/sharpness.png)" in markdown
    assert "λ_max / stability threshold" in markdown


def test_the_core_report_names_no_shipped_probe():
    shipped = [entry.name for entry in registry("probes") if entry.report and entry.report.startswith("normzoo_probes")]
    assert {"landscape", "ics", "activations", "hessian", "sharpness", "effective-lr"} <= set(shipped)
    for source in CORE_REPORT_SOURCES:
        text = source.read_text()
        for name in shipped:
            pattern = rf"\b({re.escape(name)}|{re.escape(name.replace('-', '_'))})\b"
            assert not re.search(pattern, text, re.IGNORECASE), f"{source.name} names the probe '{name}'"


def test_a_report_that_cannot_be_loaded_falls_back_and_says_so(third_party_probes, capsys):
    from nz_test_probe_reports import WobbleProbe

    class BrokenReportProbe(WobbleProbe):
        name = "nz-broken-report"
        report = "nz_test_probe_reports:NoSuchReport"

    class Plugin:
        @hookimpl
        def register_probes(self, register):
            register(BrokenReportProbe.name, BrokenReportProbe, summary="its report is missing")

    third_party_probes.register(Plugin(), name="nz-test-broken-report")
    assert type(report_for("nz-broken-report")) is ProbeReport
    assert "its report 'nz_test_probe_reports:NoSuchReport' cannot be used" in capsys.readouterr().err


def test_a_log_scaled_panel_with_nothing_positive_stays_linear_instead_of_failing():
    # A scheme whose runs diverged before a second activations measurement has a drift curve of NaN only; on a log
    # axis that made matplotlib's layout raise and took the whole report down.
    import matplotlib.pyplot as plt
    import numpy as np

    from normzoo.report.figures import _fitting_scale

    fig, (empty, drawn) = plt.subplots(1, 2)
    for ax in (empty, drawn):
        ax.plot([75.0], [np.nan], marker="o")
        ax.fill_between([75.0], [np.nan], [np.nan])
    drawn.plot([75.0, 150.0], [0.0, 0.3])
    assert _fitting_scale(empty, "log") == "linear" and _fitting_scale(drawn, "log") == "log"
    assert _fitting_scale(empty, "symlog") == "symlog"
    for ax in (empty, drawn):
        ax.set(yscale=_fitting_scale(ax, "log"))
    fig.tight_layout()
    plt.close(fig)
