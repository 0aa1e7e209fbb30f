"""Run configuration: one plain dataclass, saved as ``config.json`` before training starts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from normzoo.errors import NormzooError, did_you_mean


@dataclass
class RunConfig:
    """Everything that determines a run. Specs are stored canonical (defaults filled) once resolved."""

    backbone: str = "vgg11"
    norm: str = "bn"
    dataset: str = "cifar10"
    data_dir: str | None = None
    steps: int | None = None  # total optimizer steps; exclusive with epochs
    epochs: float | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: Literal["sgd", "adam"] = "sgd"
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    augment: bool = False  # random crop (padding 4) + horizontal flip, on the device; off as in the paper
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    channels_last: bool | None = None  # None: on for CUDA, off on CPU
    compile: str | None = None  # a torch.compile mode ("default", "reduce-overhead", "max-autotune", ...)
    log_every: int = 20
    eval_every: int | None = None  # steps between test evaluations; None: once per epoch and at the end
    divergence_factor: float = 1e3  # loss above this multiple of the first step's loss counts as diverged
    probes: list[str] = field(default_factory=list)
    out: str = "runs"
    run_name: str | None = None
    preset: str | None = None

    def total_steps(self, train_size: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, round((self.epochs or 1) * (train_size // self.batch_size)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise NormzooError(f"config has unknown fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise NormzooError(f"no config.json at {path}") from None
        except json.JSONDecodeError as exc:
            raise NormzooError(f"{path} is not valid JSON: {exc}") from None

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}"),
            (self.lr >= 0, f"--lr must be ≥ 0, got {self.lr}"),
            (self.steps is None or self.steps >= 1, f"--steps must be ≥ 1, got {self.steps}"),
            (self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (not (self.steps is not None and self.epochs is not None), "give --steps or --epochs, not both"),
            (self.log_every >= 1, f"--log-every must be ≥ 1, got {self.log_every}"),
            (self.eval_every is None or self.eval_every >= 1, f"--eval-every must be ≥ 1, got {self.eval_every}"),
            (self.divergence_factor > 1, f"--divergence-factor must be > 1, got {self.divergence_factor}"),
        ]
        for ok, message in checks:
            if not ok:
                raise NormzooError(message)


# Santurkar et al. 2018, §A: plain SGD, lr 0.1, batch 128, 15k steps, no augmentation, Glorot init, constant lr.
PRESETS: dict[str, dict[str, Any]] = {
    "santurkar2018": {
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 128,
        "steps": 15_000, "augment": False, "schedule": "constant", "glorot": True,
    },
}


def apply_preset(name: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """Preset values under the options the user gave explicitly (explicit ones win)."""
    if name not in PRESETS:
        raise NormzooError(f"unknown preset '{name}'{did_you_mean(name, PRESETS)}; valid: {', '.join(PRESETS)}")
    values = {k: v for k, v in PRESETS[name].items() if k != "glorot"}
    values.update(explicit)
    if PRESETS[name].get("glorot") and "glorot=" not in values.get("backbone", "vgg11"):
        backbone = values.get("backbone", "vgg11")
        if backbone.startswith("vgg"):
            values["backbone"] = f"{backbone},glorot=true"
    values["preset"] = name
    return values
