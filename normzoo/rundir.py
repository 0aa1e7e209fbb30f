"""The run directory: config first, an append-only metrics log, a one-row summary, checkpoints."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from normzoo.io import atomic_write_json, atomic_write_text

SUMMARY_FIELDS = [
    "run", "backbone", "norm", "dataset", "seed", "lr", "batch_size", "status", "step", "total_steps",
    "diverged_step", "train_loss", "train_acc", "test_loss", "test_acc", "best_test_acc", "best_step",
    "train_time_s", "probe_time_s", "images_per_s", "world_size",
]


class RunDir:
    """Paths and writers for one run (DESIGN §10)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.csv"
        self.last = self.path / "last.safetensors"
        self.last_state = self.path / "last.state.safetensors"
        self.best = self.path / "best.safetensors"

    @staticmethod
    def new_name(backbone: str, norm: str, seed: int) -> str:
        """``<time>-<backbone>-<norm>-s<seed>`` with characters that are awkward in paths replaced."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{backbone}-{norm}")
        return f"{stamp}-{safe}-s{seed}"

    def create(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config, config)

    def log(self, record: dict[str, Any]) -> None:
        # One line per record, flushed: a crash loses at most the line being written.
        with self.metrics.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop records written after the checkpoint at ``step`` that a resume is about to redo.

        Probes at ``step`` run before that step's update, i.e. after the checkpoint, so they go too.
        """
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            record = _parse(line)
            if record is not None and (record.get("step", -1) < step or
                                       (record.get("step") == step and record.get("type") != "probe")):
                kept.append(line)
        atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))

    def read_log(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [r for r in map(_parse, self.metrics.read_text().splitlines()) if r is not None]

    def write_summary(self, row: dict[str, Any]) -> None:
        write_csv(self.summary, SUMMARY_FIELDS, [row])

    def read_summary(self) -> dict[str, str]:
        """The summary row as strings, or ``{}`` while the run has none."""
        try:
            with self.summary.open(newline="") as f:
                return next(csv.DictReader(f), {})
        except FileNotFoundError:
            return {}


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
