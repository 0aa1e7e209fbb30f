"""Reading run folders back and reducing them to the numbers a report compares (no plotting here).

Everything works on the files a run writes (``config.json``, ``metrics.jsonl``, ``summary.csv``), so a report
can be made from runs of another machine, an interrupted sweep, or a sweep still in progress.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normzoo.errors import NormzooError
from normzoo.probe_report import report_for
from normzoo.rundir import RunDir

# Config fields that never make two runs different experiments.
INCIDENTAL_FIELDS = {"seed", "out", "run_name", "data_dir", "device", "log_every", "eval_every", "probes", "loggers"}


@dataclass
class Run:
    """One run folder, read back: its config, summary, and its records split by type."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, str]
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    probes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.summary.get("status") or "incomplete"

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def chance(self) -> float | None:
        """The accuracy of guessing, 1 / classes, from the header of the run's checkpoint (best, else last); None
        for a run that measures no accuracy (regression) or whose checkpoints were not kept."""
        if not any("acc" in record for record in self.evals):
            return None
        from normzoo.checkpoint import read_checkpoint_info

        for name in ("best.safetensors", "last.safetensors"):
            try:
                return 1 / int(read_checkpoint_info(self.path / name)["num_classes"])
            except (NormzooError, KeyError, ValueError, TypeError, ZeroDivisionError):
                continue
        return None

    def final(self, key: str) -> float:
        """A summary number (``test_acc``, ``train_loss``, ...), NaN where the run has none."""
        try:
            return float(self.summary[key])
        except (KeyError, ValueError):
            return math.nan


def load_run(path: str | Path) -> Run:
    run_dir = RunDir(path)
    try:
        config = json.loads(run_dir.config.read_text())
    except FileNotFoundError:
        raise NormzooError(f"{path} is not a run folder (no config.json)") from None
    except ValueError as exc:
        raise NormzooError(f"{run_dir.config} is not valid JSON: {exc}") from None
    run = Run(Path(path), config, run_dir.read_summary())
    for record in run_dir.read_log():
        kind = record.get("type")
        if kind == "train":
            run.train.append(record)
        elif kind == "eval":
            run.evals.append(record)
        elif kind == "probe":
            run.probes.setdefault(str(record.get("probe")), []).append(record)
    return run


def find_runs(path: str | Path) -> list[Run]:
    """The run in ``path``, or every run folder below it (a sweep folder), in name order."""
    root = Path(path)
    if not root.is_dir():
        raise NormzooError(f"{path} is not a folder")
    if (root / "config.json").exists():
        return [load_run(root)]
    folders = sorted({p.parent for p in root.glob("*/config.json")} | {p.parent for p in root.glob("*/*/config.json")})
    if not folders:
        raise NormzooError(f"{path} holds no runs (no */config.json); give a run folder or a sweep folder")
    return [load_run(p) for p in folders]


# -- per-run reductions ------------------------------------------------------------------------------------------
def probe_summaries(probes: dict[str, list[dict[str, Any]]], config: dict[str, Any] | None = None
                    ) -> dict[str, float]:
    """Every probe's summary scalars for one run (``config``: its config.json), as its report computes them
    (:meth:`normzoo.probe_report.ProbeReport.summarize`): by default ``<probe>_<value>_median`` for every scalar
    it records, third-party probes included."""
    out: dict[str, float] = {}
    for name, records in sorted(probes.items()):
        out.update(report_for(name).summarize(records, config))
    return out


def steps_to_accuracy(run: Run, target: float) -> float:
    """The first logged step whose training accuracy reaches ``target``; inf if it never does."""
    for record in run.train:
        if (record.get("acc") or 0.0) >= target:
            return float(record["step"])
    return math.inf


def _as_float(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def value_at_loss(records: Sequence[dict[str, Any]], key: str, level: float) -> float:
    """``key`` where a run's probe-batch loss first falls to ``level``, interpolated linearly (in loss) between
    that probe and the one before; NaN if the loss never gets there (the run is still above it)."""
    previous: tuple[float, float] | None = None
    for record in records:
        loss, value = _as_float(record.get("loss")), _as_float(record.get(key))
        if not (math.isfinite(loss) and math.isfinite(value)):
            continue
        if loss <= level:
            if previous is None or previous[0] == loss:
                return value
            weight = (previous[0] - level) / (previous[0] - loss)
            return previous[1] + weight * (value - previous[1])
        previous = (loss, value)
    return math.nan


# -- across runs ---------------------------------------------------------------------------------------------------
def ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank; inf ranks after every finite value (NaN not allowed)."""
    array = np.asarray(values, dtype=float)
    if np.isnan(array).any():
        raise ValueError("ranks of NaN are undefined")
    order = np.argsort(array, kind="stable")
    result = np.empty(len(array))
    i = 0
    while i < len(array):
        j = i
        while j + 1 < len(array) and array[order[j + 1]] == array[order[i]]:
            j += 1
        result[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the average ranks); NaN when undefined."""
    pairs = [(x, y) for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 3:
        return math.nan
    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def varying_fields(runs: Sequence[Run]) -> list[str]:
    """Config fields that differ between runs and define different experiments (seed excluded)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys and k not in INCIDENTAL_FIELDS]
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
