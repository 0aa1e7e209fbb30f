"""The run directory: config first, an append-only metrics log, a one-row summary, checkpoints.

What a run folder promises (the README's "Guarantees" section says it for users):

- One writer: :func:`claim_new_run` and :meth:`RunDir.claim` hold the folder's ``run.lock``
  (:mod:`normzoo.lock`) while a process writes it; a second process is refused with the holder's pid and host.
- Never overwritten by accident: a folder that already holds a run is refused unless ``overwrite=True``.
- One checkpoint unit: ``last.safetensors`` holds the weights and the whole training state (optimizer, RNG,
  loop counters), written by one atomic rename, so a crash at any point leaves the previous or the new
  checkpoint, never a mix. Temporary files a killed process left behind are removed when the run is claimed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normzoo.errors import NormzooError
from normzoo.io import atomic_write_json, atomic_write_text
from normzoo.lock import RunLock

@dataclass
class RunSummary:
    """The one row of ``summary.csv``: how a run ended, its final and best numbers, its time."""

    run: str
    backbone: str
    norm: str
    dataset: str
    seed: int
    lr: float
    batch_size: int
    status: str  # finished | diverged | interrupted | failed
    step: int
    total_steps: int
    diverged_step: int | None = None
    train_loss: float | None = None
    train_acc: float | None = None
    test_loss: float | None = None
    test_acc: float | None = None
    best_test_acc: float | None = None
    best_step: int | None = None
    train_time_s: float = 0.0
    probe_time_s: float = 0.0
    images_per_s: float | None = None
    world_size: int = 1


SUMMARY_FIELDS = [f.name for f in dataclasses.fields(RunSummary)]
# What ``normzoo run`` prints of it, in this order.
SHOWN_FIELDS = ["run", "backbone", "norm", "dataset", "status", "step", "train_loss", "train_acc", "test_loss",
                "test_acc", "best_test_acc", "train_time_s", "probe_time_s", "images_per_s"]


# Files a run writes (the sweep's run.log and sweep-run.json, and the lock, are not the run's own).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.csv", "last.safetensors", "best.safetensors",
             "last.state.safetensors")


class RunDir:
    """Paths and writers for one run (the layout is described in the README's "The runner")."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.csv"
        self.last = self.path / "last.safetensors"
        self.best = self.path / "best.safetensors"
        # Before weights and training state became one file, the state had a file of its own.
        self.legacy_state = self.path / "last.state.safetensors"

    def has_run(self) -> bool:
        """Whether the folder holds (part of) a run: a config, metrics, a summary or a checkpoint."""
        return any((self.path / name).exists() for name in RUN_FILES)

    def has_checkpoint(self) -> bool:
        """Whether there is a last checkpoint to resume from."""
        return self.last.exists()

    def claim(self) -> RunLock:
        """Hold the folder's lock (or raise :class:`normzoo.lock.RunLocked` naming the holder) and remove the
        temporary files a killed writer left behind."""
        lock = RunLock(self.path).acquire()
        self.remove_temp_files()
        return lock

    def remove_temp_files(self) -> list[Path]:
        """Delete half-written ``.<name>.<random>.tmp`` files (only while holding the lock: none can be live)."""
        stale = [p for p in self.path.glob(".*.tmp") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def remove_run_files(self) -> None:
        """Delete the run's own files (``--overwrite``, or a run that failed before its first step)."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        self.remove_temp_files()

    @staticmethod
    def new_name(backbone: str, norm: str, seed: int) -> str:
        """``<time>-<backbone>-<norm>-s<seed>`` with characters that are awkward in paths replaced."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{backbone}-{norm}")
        return f"{stamp}-{safe}-s{seed}"

    def create(self, config: dict[str, Any]) -> None:
        atomic_write_json(self.config, config)

    def log(self, record: dict[str, Any]) -> None:
        # One line per record, flushed: a crash loses at most the line being written.
        with self.metrics.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop records written after the checkpoint at ``step`` that a resume is about to redo.

        Probes at ``step`` run before that step's update, i.e. after the checkpoint, so they go too; so does the
        status record that ended the session at ``step``, as the resumed session will record how it ends.
        """
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            record = _parse(line)
            if record is not None and (record.get("step", -1) < step or
                                       (record.get("step") == step and record.get("type") not in ("probe", "status"))):
                kept.append(line)
        atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))

    def read_log(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [r for r in map(_parse, self.metrics.read_text().splitlines()) if r is not None]

    def write_summary(self, summary: RunSummary) -> None:
        write_csv(self.summary, SUMMARY_FIELDS, [dataclasses.asdict(summary)])

    def read_summary(self) -> dict[str, str]:
        """The summary row as strings, or ``{}`` while the run has none."""
        try:
            with self.summary.open(newline="") as f:
                return next(csv.DictReader(f), {})
        except FileNotFoundError:
            return {}


def claim_new_run(out: str | Path, name: str, *, unique: bool, overwrite: bool = False
                  ) -> tuple[RunDir, RunLock, bool]:
    """Make (or take) the folder ``out/name`` for a new run and hold its lock; returns (run, lock, created).

    ``unique`` (time-stamped default names): another process may pick the same name in the same second, so the
    folder is created exclusively and ``-2``, ``-3``, ... are appended until one is new. Otherwise the folder may
    exist (a sweep prepares it) but must not hold a run, unless ``overwrite`` replaces that run's files.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NormzooError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if unique:
        for i in itertools.count(1):
            path = out / (name if i == 1 else f"{name}-{i}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        created = True
    else:
        path = out / name
        created = not path.exists()
        path.mkdir(exist_ok=True)
    run = RunDir(path)
    try:
        lock = run.claim()
    except BaseException:
        if created:
            path.rmdir()
        raise
    if run.has_run():
        if not overwrite:
            lock.release()
            status = run.read_summary().get("status") or ("resumable" if run.has_checkpoint() else "incomplete")
            raise NormzooError(f"{path} already holds a run ({status}); continue it with --resume {path}, choose "
                               "another --run-name, or pass --overwrite to replace it")
        run.remove_run_files()
    return run, lock, created


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    """Atomically write ``rows`` (floats to 6 significant digits, None as empty) under a header of ``columns``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    return atomic_write_text(path, buffer.getvalue())


def _parse(line: str) -> dict[str, Any] | None:
    """A metrics record, or None for a blank or half-written line (a crash mid-write)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value
