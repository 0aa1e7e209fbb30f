"""Experiment trackers: where a run's records go besides ``metrics.jsonl``, which stays the source of truth.

A logger is registered through the ``register_loggers`` hook and chosen with ``--log SPEC`` (repeatable):
``tensorboard``, ``wandb:mode=online,project=mine``, or a plugin's. :class:`Logger` is the contract;
:class:`Loggers` is what the runner holds: it passes every record to every logger and drops, with one line on
stderr, a logger that raises, so a tracker can never stop a run or lose a record from ``metrics.jsonl``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from normzoo.errors import NormzooError


class Logger:
    """Base class of the loggers (every method is optional to override)."""

    name = "logger"

    def open(self, run_dir: Path, config: dict[str, Any], step: int) -> None:
        """The run folder exists; ``step`` > 0 when the run resumes from a checkpoint at that step (records
        after it were dropped from ``metrics.jsonl`` and will be written again)."""

    def log(self, record: dict[str, Any]) -> None:
        """One record exactly as written to ``metrics.jsonl`` (``type`` train, eval, probe, status, ...)."""

    def close(self) -> None:
        """The run ended (finished, diverged, interrupted or failed)."""


def require(module: str, extra: str, spec: str) -> None:
    """A one-line error naming what to install when ``module`` is missing (checked before anything runs)."""
    if importlib.util.find_spec(module) is None:
        raise NormzooError(f"--log {spec} needs the {module} package, which is not installed: "
                           f"pip install 'normzoo[{extra}]'")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers under tracker tags: ``train/loss``, ``eval/acc``, ``probe/<name>/<field>``."""
    kind = record.get("type")
    if kind not in ("train", "eval", "probe"):
        return {}
    prefix = f"probe/{record.get('probe')}" if kind == "probe" else kind
    skip = {"type", "probe", "step", "batch_size", "mode"}
    return {f"{prefix}/{key}": float(value) for key, value in record.items()
            if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)}


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The run config as flat hyperparameters (lists and None become text)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in config.items()}


class Loggers:
    """The loggers of one run, each in its own guard."""

    def __init__(self, specs: list[str]) -> None:
        from normzoo.plugins import registry

        self.active: list[tuple[str, str, Logger]] = []
        for spec in specs:
            resolved = registry("loggers").resolve(spec)
            self.active.append((resolved.short(), resolved.entry.origin, resolved.build()))

    def open(self, run_dir: Path, config: dict[str, Any], step: int) -> None:
        self._each("open", run_dir, config, step)

    def log(self, record: dict[str, Any]) -> None:
        self._each("log", record)

    def close(self) -> None:
        self._each("close")
        self.active = []

    def _each(self, method: str, *args: Any) -> None:
        for entry in list(self.active):
            name, origin, logger = entry
            try:
                getattr(logger, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop a run
                self.active.remove(entry)
                print(f"normzoo: logger '{name}' ({origin}) raised in {method}(): {type(exc).__name__}: "
                      f"{' '.join(str(exc).split())[:200]}; it is dropped for the rest of this run, whose records "
                      "still go to metrics.jsonl", file=sys.stderr)
