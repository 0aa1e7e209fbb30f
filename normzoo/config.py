"""Run configuration: one plain dataclass, saved as ``config.json`` before training starts."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from normzoo.errors import NormzooError, did_you_mean

# Fields a config written by an older normzoo lacks, with the value that run had in effect.
LEGACY_DEFAULTS = {"decay_skip": "none"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MAX_SEED = 2**32 - 1  # numpy's seed range; torch's generators take it too


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
    # Parameters weight decay skips: those a norm marks (``no_weight_decay()``); timm's convention (every norm
    # parameter and bias); or none (how every run before this option trained, and how those runs resume).
    decay_skip: Literal["marked", "norm-bias", "none"] = "marked"
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
    loggers: list[str] = field(default_factory=list)  # experiment trackers (--log), besides metrics.jsonl
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
    def from_dict(cls, data: Any, *, source: str = "config") -> RunConfig:
        """A config from JSON-like data, every field's type checked (a one-line error names the field)."""
        if not isinstance(data, dict):
            raise NormzooError(f"{source} must hold a JSON object, not {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = [k for k in data if k not in hints]
        if unknown:
            raise NormzooError(f"{source} has unknown fields: {', '.join(sorted(map(str, unknown)))[:200]}")
        values = {}
        for key, value in data.items():
            if not _fits(value, hints[key]):
                raise NormzooError(f"{source}: '{key}' must be {_type_name(hints[key])}, got {json.dumps(value)[:60]}")
            values[key] = float(value) if _fits(value, float) and hints[key] in (float, float | None) else value
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """A run folder's ``config.json``; fields added since it was written take the value that reproduces it."""
        try:
            data = json.loads(Path(path).read_text())
            if isinstance(data, dict):
                data = {**LEGACY_DEFAULTS, **data}
            return cls.from_dict(data, source=str(path))
        except FileNotFoundError:
            raise NormzooError(f"no config.json at {path}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NormzooError(f"{path} is not valid JSON: {exc}") from None

    def validate(self) -> None:
        """Every value in range, as a one-line :class:`NormzooError` naming the option."""
        checks = [
            (self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}"),
            (_finite(self.lr) and self.lr >= 0, f"--lr must be a finite number ≥ 0, got {self.lr}"),
            (_finite(self.momentum) and 0 <= self.momentum <= 1,
             f"--momentum must be in [0, 1], got {self.momentum}"),
            (_finite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be a finite number ≥ 0, got {self.weight_decay}"),
            (self.steps is None or self.steps >= 1, f"--steps must be ≥ 1, got {self.steps}"),
            (self.epochs is None or (_finite(self.epochs) and self.epochs > 0),
             f"--epochs must be a finite number > 0, got {self.epochs}"),
            (not (self.steps is not None and self.epochs is not None), "give --steps or --epochs, not both"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be in 0..{MAX_SEED}, got {str(self.seed)[:40]}"),
            (self.log_every >= 1, f"--log-every must be ≥ 1, got {self.log_every}"),
            (self.eval_every is None or self.eval_every >= 1, f"--eval-every must be ≥ 1, got {self.eval_every}"),
            (_finite(self.divergence_factor) and self.divergence_factor > 1,
             f"--divergence-factor must be a finite number > 1, got {self.divergence_factor}"),
            (self.compile is None or self.compile in COMPILE_MODES,
             f"--compile mode must be one of {', '.join(COMPILE_MODES)}, got '{str(self.compile)[:40]}'"
             f"{did_you_mean(str(self.compile), COMPILE_MODES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise NormzooError(message)
        for key in ("optimizer", "schedule", "amp", "decay_skip"):
            choices = typing.get_args(typing.get_type_hints(RunConfig)[key])
            if getattr(self, key) not in choices:
                raise NormzooError(f"--{key} must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        if self.run_name is not None:
            check_run_name(self.run_name)


def check_run_name(name: str) -> None:
    """A run name is one path component: it can only ever name a folder directly inside ``--out``."""
    problem = ("is empty" if not name.strip() else "is '.' or '..'" if name.strip() in (".", "..")
               else "contains a path separator" if "/" in name or "\\" in name
               else "contains a NUL character" if "\0" in name
               else "is longer than 200 characters" if len(name) > 200 else "")
    if problem:
        raise NormzooError(f"--run-name {json.dumps(name)[:80]} {problem}; a run name is one folder name inside "
                           "--out (use --out to choose where runs go)")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a RunConfig field's type (bool is not a number; ints are floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, args))
    if typing.get_origin(hint) is list:
        return "a list of strings"
    if args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else "")
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


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
