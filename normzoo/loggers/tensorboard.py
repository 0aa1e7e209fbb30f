"""TensorBoard: event files in ``<run>/tensorboard`` (``--log tensorboard``; ``pip install 'normzoo[tensorboard]'``).

Scalars: ``train/loss``, ``train/acc``, ``train/lr``, ``train/images_per_s``, ``eval/loss``, ``eval/acc`` and
every probe's scalar fields as ``probe/<name>/<field>``; the run config as hparams (the hparams tab). A resumed run
purges the events after its checkpoint's step, as ``metrics.jsonl`` drops those records, so TensorBoard shows one
history. ``tensorboard --logdir SWEEP_FOLDER`` shows a sweep's runs side by side, named by their folders, which
are named by what varies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from normzoo.loggers import Logger, hparams, require, scalars


class TensorBoardLogger(Logger):
    """Writes the run's records as TensorBoard scalars (see the module docstring)."""

    name = "tensorboard"

    def __init__(self, *, folder: str = "tensorboard", flush_secs: int = 30) -> None:
        require("tensorboard", "tensorboard", "tensorboard")
        self.folder, self.flush_secs = folder, flush_secs
        self.writer: Any = None

    def open(self, run_dir: Path, config: dict[str, Any], step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events after the checkpoint's step (the resumed run writes them again) are dropped; those at
        # it stay, as metrics.jsonl keeps that step's train and eval records.
        self.writer = SummaryWriter(log_dir=str(run_dir / self.folder), flush_secs=self.flush_secs,
                                    purge_step=step + 1 if step else None)
        if not step:
            self._hparams(config)

    def _hparams(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams as summary

        # Written into this run's own event file (SummaryWriter.add_hparams would make a sub-run for it).
        experiment, start, end = summary(hparams(config), {"eval/acc": 0.0, "eval/loss": 0.0})
        for event in (experiment, start, end):
            self.writer.file_writer.add_summary(event)

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)
        if record.get("type") == "status":
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
