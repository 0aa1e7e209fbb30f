"""``normzoo report``: the numbers (checked against formulas), the files, and the HTML in a real Chromium."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from normzoo.analysis import Run, find_runs, probe_summaries, ranks, spearman, steps_to_accuracy, value_at_loss
from normzoo.cli import cli
from normzoo.config import RunConfig
from normzoo.report import findings, write_report
from normzoo.report.schemes import Scheme, compute, correlations
from normzoo.runner import train

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


# -- numbers -----------------------------------------------------------------------------------------------------
def test_spearman_matches_the_closed_form_without_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.permutation(7).astype(float), rng.permutation(7).astype(float)
        n, d2 = 7, float(((a - b) ** 2).sum())
        assert spearman(a, b) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))


def test_ranks_average_ties_and_put_inf_last():
    assert ranks([3.0, 1.0, 3.0, math.inf, math.inf]).tolist() == [2.5, 1.0, 2.5, 4.5, 4.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, math.inf]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2]))  # fewer than 3 points
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))  # constant: undefined
    assert spearman([1, 2, math.nan, 3], [1, 2, 0, 3]) == pytest.approx(1.0)  # NaN pairs are left out


def run_with(train_records=(), landscape=(), config=None, status="finished", summary=None) -> Run:
    run = Run(Path("/x/run"), config or {"norm": "bn", "seed": 0}, {"status": status, **(summary or {})})
    run.train, run.probes = list(train_records), {"landscape": list(landscape)} if landscape else {}
    return run


def test_steps_to_accuracy_and_value_at_matched_loss():
    run = run_with([{"step": 10, "acc": 0.3}, {"step": 20, "acc": 0.62}, {"step": 30, "acc": 0.7}])
    assert steps_to_accuracy(run, 0.6) == 20 and steps_to_accuracy(run, 0.62) == 20
    assert steps_to_accuracy(run, 0.9) == math.inf
    records = [{"loss": 2.3, "beta": 10.0}, {"loss": 1.5, "beta": 30.0}, {"loss": 0.5, "beta": 50.0}]
    assert value_at_loss(records, "beta", 1.9) == pytest.approx(20.0)  # halfway between 2.3 and 1.5
    assert value_at_loss(records, "beta", 1.5) == pytest.approx(30.0)
    assert value_at_loss(records, "beta", 2.5) == pytest.approx(10.0)  # already below at the first probe
    assert math.isnan(value_at_loss(records, "beta", 0.1))  # never reached


def test_probe_summaries_are_medians_and_band_widths():
    landscape = [{"step": s, "loss_min": lo, "loss_max": hi, "grad_dist_min": 1.0, "grad_dist_max": g, "beta": b,
                  "step_sizes": [0.1, 0.2], "seconds": 9.0}
                 for s, lo, hi, g, b in [(0, 1.0, 2.0, 3.0, 5.0), (10, 1.0, 1.5, 2.0, 7.0), (20, 1.0, 1.1, 5.0, 100.0)]]
    ics = [{"step": 0, "l2": [0.1, -0.3], "cos": [0.9, 0.5]}, {"step": 10, "l2": [0.2, 0.4], "cos": [0.7, 0.8]}]
    out = probe_summaries({"landscape": landscape, "ics": ics, "my-probe": [{"step": 0, "score": 2.0, "ok": True}]})
    assert out["landscape_beta_median"] == 7.0
    assert out["landscape_loss_band_median"] == pytest.approx(0.5)
    assert out["landscape_grad_band_median"] == pytest.approx(2.0)
    assert out["ics_l2_median"] == pytest.approx(0.25) and out["ics_cos_median"] == pytest.approx(0.75)
    assert out["my_probe_score_median"] == 2.0  # a third-party probe's scalars are summarised too
    assert "landscape_seconds_median" not in out and "my_probe_ok_median" not in out


def test_correlation_sign_and_the_equal_steps_trap_are_reported():
    def scheme(label, beta, acc, losses):
        train = [{"step": 10 * i, "loss": l, "acc": a} for i, (l, a) in enumerate(zip(losses, acc))]
        land = [{"step": 10 * i, "loss": l, "beta": beta} for i, l in enumerate(losses)]
        runs = [run_with(train, land, {"norm": label, "seed": s}, summary={"train_acc": acc[-1]}) for s in (0, 1)]
        return Scheme(label, label, runs, {"norm": label})

    schemes = [scheme("bn", 5.0, [0.3, 0.8, 0.9], [2.3, 0.8, 0.4]),
               scheme("lp:inf", 8.0, [0.2, 0.5, 0.85], [2.3, 1.2, 0.6]),
               scheme("gn", 12.0, [0.1, 0.3, 0.6], [2.3, 1.8, 1.0]),
               scheme("none", 1.0, [0.1, 0.1, 0.1], [2.3, 2.3, 2.29])]
    targets = {"target_acc": 0.8, "matched_loss": 1.0}
    for s in schemes:
        s.context = targets
    rows = {r["comparison"]: r for r in correlations(schemes)}
    # bn, lp:inf, gn: smoother is faster; none (smoothest, never trains) ranks last on speed: ρ = 0.2 exactly.
    equal = rows["median β (equal steps) vs steps to target accuracy"]
    assert equal["rho_mean"] == pytest.approx(spearman([5, 8, 12, 1], [10, 20, math.inf, math.inf]))
    assert equal["rho_min"] == equal["rho_max"] and equal["seeds"] == 2
    assert rows["β at matched loss vs steps to target accuracy"]["rho_mean"] == pytest.approx(1.0)  # none has no value
    notes = " ".join(findings(schemes, 1.0))
    assert "`none` never left its initial plateau" in notes
    assert "lower than that of `bn`, `lp:inf`, `gn`" in notes and "0 of 2 runs" in notes


# -- real runs, the files, the browser ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Three schemes × two seeds of real tiny runs; in 24 steps `none` does not leave its initial plateau."""
    root = tmp_path_factory.mktemp("report")
    for norm in ("bn", "lp:inf", "none"):
        for seed in (0, 1):
            train(RunConfig(backbone="vgg11,width=0.0625", norm=norm, dataset="fashion-mnist-mini", steps=24,
                            batch_size=32, lr=0.05, seed=seed, device="cpu", log_every=4, eval_every=12, out=str(root),
                            run_name=f"{norm.replace(':', '_')}-s{seed}",
                            probes=["landscape:every=6,steps=3", "ics:every=12", "activations:every=6",
                                    "hessian:at=0+12,iters=3,trace_samples=2", "grad-norms:every=12",
                                    "step-loss:at=12,steps=3"]), quiet=True)
    return root


@pytest.mark.slow
def test_a_run_knows_its_chance_accuracy_from_its_checkpoint(runs_dir, tmp_path):
    from normzoo.analysis import load_run

    assert load_run(runs_dir / "bn-s0").chance() == pytest.approx(0.1)  # Fashion-MNIST's 10 classes
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "metrics.jsonl", "summary.csv"):  # a run folder whose checkpoints were not kept
        (bare / name).write_bytes((runs_dir / "bn-s0" / name).read_bytes())
    assert load_run(bare).chance() is None


@pytest.fixture(scope="module")
def reported(runs_dir) -> Path:
    """``normzoo report`` of the runs, written once for the tests that read its files."""
    result = CliRunner().invoke(cli, ["report", str(runs_dir), "--target-acc", "0.3"])
    assert result.exit_code == 0, result.output
    return runs_dir


@pytest.mark.slow
def test_report_files_are_complete_and_self_contained(reported):
    runs_dir = reported
    page = (runs_dir / "report.html").read_text()
    markdown = (runs_dir / "report.md").read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 8 and all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: works offline
    for name in re.findall(r"\]\((report-figures/[^)]+\.png)\)", markdown):
        assert (runs_dir / name).read_bytes().startswith(b"\x89PNG")
    assert markdown.count("](report-figures/") == len(images)
    assert "steps to 0.3 train acc" in markdown
    schemes, _ = compute(find_runs(runs_dir), 0.3)
    assert [s.label for s in schemes] == ["bn", "lp:inf", "none"]
    table = markdown.split("*Smoothness against speed*")[1].split("\n\n")[1]
    assert len(table.splitlines()) == 2 + 3
    assert "`none` never left its initial plateau" in markdown
    rho = re.search(r"\| all \| median β \(equal steps\) vs steps to target accuracy \| ([^|]+) \|", markdown)
    assert rho and -1 <= float(rho.group(1)) <= 1  # three schemes: ρ is defined
    for figure_title in ("## Training", "## Loss landscape along the gradient", "## Internal covariate shift",
                         "## Activation drift", "## Hessian", "## Equal steps or equal progress?"):
        assert figure_title in markdown and figure_title.replace("## ", "<h2>") in page


@pytest.mark.slow
def test_report_of_one_run_and_of_a_folder_without_runs(runs_dir, tmp_path):
    single = tmp_path / "one"
    shutil.copytree(runs_dir / "bn-s0", single)
    files = write_report(single)
    assert "1 runs (1 finished) in 1 schemes" in files.markdown.read_text()
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "one" / "report-figures")])
    assert result.exit_code == 2 and "holds no runs" in result.output
    (single / "config.json").write_text("{not json")
    result = CliRunner().invoke(cli, ["report", str(single)])
    assert result.exit_code == 2 and "config.json is not valid JSON" in result.output


CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.src) || e.type)),
                        true);
const original = console.error;
console.error = (...args) => { window.__errors.push(args.join(' ')); original(...args); };
window.addEventListener('load', () => {
  const pre = document.createElement('pre');
  pre.id = 'normzoo-check';
  pre.textContent = JSON.stringify({images: Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight]),
                                    errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium (Debian: apt-get install chromium)")


def browser_check(page: Path) -> tuple[dict, str]:
    """Load ``page`` (with the check script injected) in headless Chromium; the images' natural sizes and errors."""
    checked = page.with_name("checked-" + page.name)
    checked.write_text(page.read_text().replace("<head>", "<head>\n" + CHECK_SCRIPT, 1))
    result = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--enable-logging=stderr", "--virtual-time-budget=10000", "--dump-dom",
                             checked.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="normzoo-check">(.*?)</pre>', result.stdout)
    assert match, result.stderr[-2000:]
    return json.loads(match.group(1).replace("&quot;", '"')), result.stderr


@pytest.mark.slow
def test_html_renders_in_headless_chromium_with_every_image_and_no_errors(reported):
    page = reported / "report.html"
    report, log = browser_check(page)
    assert report["errors"] == [] and "CONSOLE" not in log
    assert len(report["images"]) == len(list((reported / "report-figures").glob("*.png"))) >= 8
    assert all(w > 0 and h > 0 for w, h in report["images"])
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-screenshot.png"
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars", "--window-size=1280,3000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000


def test_the_browser_check_catches_a_broken_image_and_a_script_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head></head><body><img src="data:image/png;base64,AAAA">'
                    "<script>undefinedFunction()</script></body></html>")
    report, _ = browser_check(page)
    assert report["images"] == [[0, 0]]
    assert any("undefinedFunction" in e for e in report["errors"])
