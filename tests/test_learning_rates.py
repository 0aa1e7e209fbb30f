"""The learning-rate section of the report: trainability, own best and shared learning rates, Spearman ρ with a
bootstrap interval and the verdict, on synthetic runs whose answers are worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_report import run_with

from normzoo.analysis import Run, spearman
from normzoo.report import build
from normzoo.report import learning_rates as lr_mod
from normzoo.report.learning_rates import (
    best_lr,
    lr_correlations,
    lr_schemes,
    lr_table,
    reading,
    section,
    shared_lr,
    smoothness_of,
    spearman_ci,
    trains,
    verdict,
)
from normzoo.report.render import Document


def make_run(norm: str, lr: float, seed: int, *, losses=(2.3, 1.0), accs=None, test_acc=0.8, status="finished",
             beta=None, summary=None) -> Run:
    """A run logging one training record per 10 steps; ``beta`` becomes one landscape record."""
    accs = accs if accs is not None else [0.1] * len(losses)
    records = [{"step": 10 * (i + 1), "loss": loss, "acc": acc} for i, (loss, acc) in enumerate(zip(losses, accs))]
    landscape = [{"step": 10, "loss": losses[0], "beta": beta}] if beta is not None else ()
    run = run_with(records, landscape, {"norm": norm, "lr": lr, "seed": seed}, status,
                   {"test_acc": str(test_acc), **(summary or {})})
    run.path = Path(f"/x/{norm}-{lr}-{seed}")
    return run


TRAINS, STUCK = (2.3, 1.0), (2.3, 2.2)


# -- trainability -----------------------------------------------------------------------------------------------
def test_a_run_trains_when_its_loss_falls_below_the_line_and_it_did_not_diverge():
    assert trains(make_run("bn", 0.1, 0, losses=(2.0, 1.79)))  # ratio 0.895 < 0.9
    assert not trains(make_run("bn", 0.1, 0, losses=(2.0, 1.8)))  # exactly 0.9: not below
    assert not trains(make_run("bn", 0.1, 0, losses=STUCK))
    assert not trains(make_run("bn", 0.1, 0, losses=TRAINS, status="diverged"))
    assert not trains(make_run("bn", 0.1, 0, losses=(2.3,)))  # one record: no ratio
    # with the chance accuracy known (10 classes), the final test accuracy must beat 0.1 + 0.05
    assert not trains(make_run("bn", 0.1, 0, test_acc=0.15), chance=0.1)
    assert trains(make_run("bn", 0.1, 0, test_acc=0.16), chance=0.1)


def grid(spec: dict[str, dict[float, list[tuple[float, ...]]]], **kwargs) -> list[Run]:
    """Runs from {norm: {lr: [losses of seed 0, of seed 1, ...]}}."""
    return [make_run(norm, lr, seed, losses=losses, **kwargs)
            for norm, by_lr in spec.items() for lr, seeds in by_lr.items() for seed, losses in enumerate(seeds)]


def test_largest_trainable_lr_needs_a_majority_of_seeds_and_says_when_it_is_the_largest_tested():
    runs = grid({"bn": {0.01: [TRAINS] * 3, 0.1: [TRAINS] * 3, 1.0: [TRAINS, TRAINS, STUCK]},
                 "none": {0.01: [TRAINS] * 3, 0.1: [TRAINS, STUCK, TRAINS], 1.0: [TRAINS, STUCK, STUCK]},
                 "lp:inf": {0.01: [STUCK] * 3, 0.1: [STUCK] * 3, 1.0: [STUCK] * 3}})
    schemes = lr_schemes(runs)
    assert [s.label for s in schemes] == ["bn", "none", "lp:inf"]
    assert all(s.lrs == [0.01, 0.1, 1.0] and all(len(r) == 3 for r in s.runs.values()) for s in schemes)
    assert [s.largest_trainable_lr() for s in schemes] == [1.0, 0.1, None]
    tested = [0.01, 0.1, 1.0]
    assert [lr_mod.trainable_text(s, tested) for s in schemes] == ["≥ 1 (max tested)", "0.1", "none"]
    # bn and none train at 0.01 and at 0.1, only bn at 1.0: a tie between 0.01 and 0.1 goes to the smaller
    assert shared_lr(schemes) == 0.01
    two_seeds = lr_schemes(grid({"bn": {0.1: [TRAINS, STUCK], 0.5: [TRAINS, TRAINS]}}))[0]
    assert not two_seeds.trains_at(0.1)  # one of two is not a majority
    assert shared_lr(lr_schemes(grid({"bn": {0.1: [STUCK], 0.5: [STUCK]}}))) is None


def target_runs() -> list[Run]:
    """Target accuracy 0.5 reached at step 10·k: bn is fastest at 0.1, none only trains at 0.01."""
    def reach(step_of_seed):
        return [[0.1] * (k - 1) + [0.6] for k in step_of_seed]

    spec = {("bn", 0.01): reach([3, 4, 2]), ("bn", 0.1): reach([1, 2, 1]),
            ("none", 0.01): reach([4, 5, 6]), ("none", 0.1): reach([1, 1, 1])}
    runs = []
    for (norm, lr), per_seed in spec.items():
        for seed, accs in enumerate(per_seed):
            losses = [2.3 - 0.2 * i for i in range(len(accs))] + [1.0]  # a last record that trains
            status = "diverged" if norm == "none" and lr == 0.1 else "finished"
            runs.append(make_run(norm, lr, seed, losses=losses, accs=accs + [0.7], status=status))
    return runs


def test_own_best_and_shared_lr_with_a_target_accuracy():
    schemes = lr_schemes(target_runs())
    assert [best_lr(s, 0.5) for s in schemes] == [0.1, 0.01]  # none's 0.1 diverged: never reaches the target
    table, shared = lr_table(schemes, 0.5)
    assert shared == 0.01
    assert table.columns[-2:] == ["steps to 0.5 train acc at own best lr", "steps to 0.5 train acc at the shared "
                                  "lr 0.01"]
    # medians over seeds of 10·k: bn at 0.1 (10, 20, 10) → 10, at 0.01 (30, 40, 20) → 30; none at 0.01 → 50
    assert table.rows == [["bn", "0.01: 3/3, 0.1: 3/3", "≥ 0.1 (max tested)", 0.1, 10.0, 30.0],
                          ["none", "0.01: 3/3, 0.1: 0/3", "0.01", 0.01, 50.0, 50.0]]
    assert reading(schemes, shared, 0.5) == (
        "At the shared learning rate 0.01 the best scheme is `bn` (steps to 0.5 train acc 30); each at its own "
        "best learning rate, `bn` (10 at lr 0.1); the largest trainable learning rate, 0.1, is reached by `bn`.")


def test_own_best_lr_by_test_accuracy_ties_go_to_the_smaller_lr_and_a_diverged_run_counts_zero():
    runs = [make_run("bn", lr, seed, test_acc=acc) for lr, accs in {0.01: (0.7, 0.8, 0.9), 0.1: (0.8, 0.8, 0.1),
                                                                    1.0: (0.9, 0.9, 0.9)}.items()
            for seed, acc in enumerate(accs)]
    runs += [make_run("none", lr, seed, test_acc=0.9, status="diverged" if seed else "finished")
             for lr in (0.01, 0.1) for seed in range(3)] + [make_run("none", 1.0, s, test_acc=0.5) for s in range(3)]
    schemes = lr_schemes(runs)
    assert [best_lr(s, None) for s in schemes] == [1.0, 1.0]  # bn: medians 0.8, 0.8, 0.9; none: 0, 0, 0.5
    tie = lr_schemes([make_run("bn", lr, 0, test_acc=0.8) for lr in (0.3, 0.1)])[0]
    assert best_lr(tie, None) == 0.1
    assert best_lr(lr_schemes([make_run("bn", 0.1, 0, test_acc=math.nan)])[0], None) is None
    table, _ = lr_table(schemes, None)
    # none trains at 1.0 only (one of three at 0.01 and 0.1): 1.0 is where both train
    assert table.columns[-1] == "final test acc at the shared lr 1"
    assert table.rows == [["bn", "0.01: 3/3, 0.1: 3/3, 1: 3/3", "≥ 1 (max tested)", 1.0, 0.9, 0.9],
                          ["none", "0.01: 1/3, 0.1: 1/3, 1: 3/3", "≥ 1 (max tested)", 1.0, 0.5, 0.5]]


# -- Spearman ρ with a bootstrap interval -----------------------------------------------------------------------
def test_spearman_ci_monotone_noise_groups_and_undefined_cases():
    rho, low, high = spearman_ci(range(10), [v ** 3 for v in range(10)])
    assert (rho, low, high) == pytest.approx((1.0, 1.0, 1.0))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=40), rng.normal(size=40)
    rho, low, high = spearman_ci(x, y)
    assert rho == pytest.approx(spearman(x, y)) and low < 0 < high and low < rho < high
    assert spearman_ci(x, y, seed=3) == spearman_ci(x, y, seed=3) != spearman_ci(x, y, seed=4)
    # Two groups of two: a resample is group 0 twice (ρ = 1), group 1 twice (ρ = −1, its y is reversed), or
    # both (ρ = 1 − 6·2/(4·15) = 0.8); each of ±1 has probability 1/4 > 5 %, so the 90 % interval is [−1, 1].
    assert spearman_ci([1, 2, 3, 4], [1, 2, 4, 3], groups=["a", "a", "b", "b"]) == pytest.approx((0.8, -1.0, 1.0))
    rho, low, high = spearman_ci([1, 2, 3], [1, 2, 3])  # fewer than 4 points: ρ, but no interval
    assert rho == pytest.approx(1.0) and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in spearman_ci([1, 2, 3, 4, 5], [2, 2, 2, 2, 2]))  # constant
    rho, low, _ = spearman_ci([1, 2, math.nan, 3, 4], [1, 2, 9, 3, math.nan])  # NaN pairs dropped: 3 left
    assert rho == pytest.approx(1.0) and math.isnan(low)
    assert math.isnan(spearman_ci([1, 2, 3, 4], [1, 2, 3, 4], groups=[0, 0, 0, 0])[1])  # one group


def test_correlation_text_states_rho_interval_and_runs():
    c = lr_mod.Correlation("x", -0.624, -0.8, -0.35, 27)
    assert c.text() == "ρ = −0.62, 90% CI [−0.80, −0.35] over 27 runs" and c.strong and c.excludes_zero
    assert not lr_mod.Correlation("x", 0.6, -0.1, 0.9, 8).strong
    assert lr_mod.Correlation("x", 0.2, math.nan, math.nan, 3).text() == "ρ = 0.20, no interval over 3 runs"


# -- the verdict ------------------------------------------------------------------------------------------------
def beta_runs(points: dict[float, list[tuple[float, float]]]) -> list[Run]:
    """Runs from {lr: [(β, steps to target), ...]}: β through the landscape probe, the steps in the summary."""
    return [make_run("bn", lr, i, beta=beta, summary={"steps": str(steps)})
            for lr, pairs in points.items() for i, (beta, steps) in enumerate(pairs)]


def judge(runs: list[Run]) -> tuple[lr_mod.LrCorrelations, str]:
    correlations = lr_correlations(runs, lambda r: r.final("steps"), n_boot=500)
    return correlations, verdict(correlations, speed_name="steps", lower_is_better=True)


def test_verdict_learning_rate_sets_the_smoothness():
    # β = (2/η)·(1 + small wobble): set by η; at each η the wobble is unrelated to speed (ρ = 0 within each η)
    wobble, steps = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07], [20, 30, 60, 80, 70, 50, 10, 40]  # Σd² = 84
    assert spearman(wobble, steps) == pytest.approx(0.0)
    runs = beta_runs({lr: [(2 / lr * (1 + w), s) for w, s in zip(wobble, steps)] for lr in (0.01, 0.1, 1.0)})
    correlations, text = judge(runs)
    # β's ranks are 1..24 in blocks of 8 by η; η's ranks are the blocks' mean ranks (ties), so ρ(β, η) is
    # −sqrt(between-block variance / total variance) = −sqrt((128/3) / (575/12)) = −sqrt(512/575)
    assert correlations.with_lr.rho == pytest.approx(-math.sqrt(512 / 575)) and correlations.with_lr.n == 24
    assert all(w.low <= 0 <= w.high and w.n == 8 for w in correlations.within.values())
    assert text.startswith("The data support **the learning rate sets the smoothness** (edge of stability)")
    assert "β has a strong rank relation with η (ρ = −0.94, 90% CI [−" in text and "] over 24 runs)" in text


def test_verdict_smoothing_separates_schemes_at_equal_lr():
    betas = [3.0, 5.0, 8.0, 13.0, 21.0, 34.0]
    runs = beta_runs({0.1: [(b, 10 * i) for i, b in enumerate(betas)],
                      1.0: [(b * 1.01, 10 * i + 5) for i, b in enumerate(betas)]})
    correlations, text = judge(runs)
    assert [(w.rho, w.low, w.high) for w in correlations.within.values()] == [pytest.approx((1.0, 1.0, 1.0))] * 2
    assert not correlations.with_lr.strong
    assert text.startswith("The data support **smoothing separates schemes at equal learning rate**: at the same η, "
                           "smoother runs (lower β) did better on steps (lr 0.1: ρ = 1.00, 90% CI [1.00, 1.00] "
                           "over 6 runs; lr 1: ρ = 1.00")


def test_verdict_cannot_tell_and_says_why():
    _, text = judge(beta_runs({0.1: [(1.0, 3), (2.0, 1), (3.0, 2)], 1.0: [(1.5, 2), (2.5, 3), (3.5, 1)]}))
    assert text.startswith("The data **cannot tell**") and "no learning rate has at least 4 runs" in text
    _, text = judge(beta_runs({0.1: [(1.0, 20), (2.0, 10), (3.0, 40), (4.0, 30)],
                               1.0: [(1.5, 10), (2.5, 40), (3.5, 20), (4.5, 30)]}))
    assert text.startswith("The data **cannot tell**") and "the intervals are wide for the number of runs" in text
    assert "and β has a weak relation with η" in text
    ranked = [(1.0, 10), (2.0, 20), (3.0, 30), (4.0, 40), (5.0, 50)]
    _, text = judge(beta_runs({0.1: ranked, 1.0: [(b, 60 - s) for b, s in ranked]}))
    assert "the within-lr relations are strong but of opposite sign" in text


# -- the section in the report ----------------------------------------------------------------------------------
def test_smoothness_is_the_measure_a_probe_report_declares():
    run = make_run("bn", 0.1, 0, beta=7.0)
    run.probes["landscape"] += [{"step": 20, "beta": 3.0}, {"step": 30, "beta": 100.0}]
    bare = make_run("bn", 0.1, 1)
    assert smoothness_of([run])(run) == 7.0  # landscape's report declares its median effective β
    assert math.isnan(smoothness_of([run, bare])(bare)) and math.isnan(smoothness_of([bare])(bare))


@pytest.mark.slow
def test_the_section_is_added_only_when_the_learning_rate_varies():
    runs = target_runs()
    doc = Document("t")
    assert section(doc, runs, 0.5)
    kinds = [kind for kind, _ in doc.blocks]
    assert kinds == ["h2", "p", "table", "p", "p"] and doc.blocks[0][1] == "Learning rate or normalization?"
    assert doc.blocks[-1][1].startswith("No run has a smoothness value")
    for run in runs:  # β = 1/η·(seed + 1): the learning rate sets it
        run.probes["landscape"] = [{"step": 10, "loss": 2.0, "beta": (run.seed + 1) / run.config["lr"]}]
    doc = Document("t")
    section(doc, runs, 0.5)
    assert [kind for kind, _ in doc.blocks] == ["h2", "p", "table", "p", "table", "p"]
    assert [row[0] for row in doc.blocks[4][1].rows] == ["β vs speed, all runs", "β·η/2 vs speed, all runs",
                                                          "β vs lr", "β vs speed at lr 0.01", "β vs speed at lr 0.1"]
    assert [row[-1] for row in doc.blocks[4][1].rows] == [12, 12, 12, 6, 6]
    assert not section(Document("t"), [r for r in runs if r.config["lr"] == 0.1], 0.5)
    markdown = build(runs, target_acc=0.5, title="t").markdown("f")
    assert "## Learning rate or normalization?" in markdown and "| bn | 0.01: 3/3, 0.1: 3/3 |" in markdown
    same_lr = [r for r in runs if r.config["lr"] == 0.01]
    assert "Learning rate or normalization?" not in build(same_lr, target_acc=0.5, title="t").markdown("f")
