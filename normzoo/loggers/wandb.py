"""Weights & Biases: a W&B run per normzoo run (``--log wandb``; ``pip install 'normzoo[wandb]'``).

Offline by default: the run's files go to ``<run>/wandb`` and nothing leaves the machine unless the user asks
(``--log wandb:mode=online``, or ``wandb sync <run>/wandb/offline-run-*`` later). The W&B run is named after the
run folder, its id is derived from the folder's path (a resumed run continues the same W&B run), the config is the
run's config, and the records are logged as ``train/...``, ``eval/...`` and ``probe/<name>/<field>`` at their step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from normzoo.loggers import Logger, hparams, require, scalars


class WandbLogger(Logger):
    """Logs the run's records to a W&B run (see the module docstring)."""

    name = "wandb"

    def __init__(self, *, mode: Literal["offline", "online", "disabled"] = "offline", project: str = "normzoo",
                 entity: str = "", group: str = "") -> None:
        require("wandb", "wandb", "wandb")
        self.mode, self.project, self.entity, self.group = mode, project, entity, group
        self.run: Any = None

    def open(self, run_dir: Path, config: dict[str, Any], step: int) -> None:
        import wandb

        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=self.project, entity=self.entity or None, group=self.group or None,
                              dir=str(run_dir), name=run_dir.name, id=run_id, resume="allow", config=hparams(config),
                              mode=self.mode, settings=wandb.Settings(silent=True, console="off"))

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
