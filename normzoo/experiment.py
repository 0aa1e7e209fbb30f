"""Experiment files: a run's or a sweep's options in one TOML file, the form a paper's repository keeps.

A **run file** (``normzoo run --config FILE``) holds ``normzoo run`` options as TOML keys (dashes or underscores,
at the top level or under ``[run]``), or is a run folder's ``config.json``. An **experiment file**
(``normzoo sweep FILE``, ``normzoo report FILE``) has up to four tables::

    [grid]    # lists: one run per combination (norm = ["bn", "lp:inf"], lr = [0.1, 0.5], seed = [0, 1, 2])
    [run]     # options every run shares (backbone, dataset, steps, probes = [...], log = [...])
    [sweep]   # how the sweep runs: out, executor, jobs, and the executor's options
    [report]  # normzoo report's options: target_acc, title

Options given on the command line as well win over the file. Unknown keys and values of the wrong type are one
line naming the key and the file; the values themselves (ranges, specs) are checked as for the command line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normzoo.errors import NormzooError, did_you_mean

TABLES = ("grid", "run", "sweep", "report")
# Keys users write as the command line spells them, and the RunConfig field each is.
ALIASES = {"probe": "probes", "log": "loggers"}
SWEEP_KEYS = {"out": str, "executor": str, "jobs": int, "address": str, "cpus_per_run": float, "gpus_per_run": float,
              "slurm_partition": str, "time": str | int, "slurm_folder": str}
REPORT_KEYS = {"target_acc": float, "title": str}


@dataclass
class Experiment:
    """An experiment file, read and checked."""

    path: Path
    grid: dict[str, list[Any]] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def read_toml(path: str | Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise NormzooError(f"no experiment file at {path}") from None
    except IsADirectoryError:
        raise NormzooError(f"{path} is a folder, not an experiment file") from None
    except tomllib.TOMLDecodeError as exc:
        raise NormzooError(f"{path} is not valid TOML: {exc}") from None


def _run_fields() -> dict[str, Any]:
    from normzoo.config import RunConfig

    return typing.get_type_hints(RunConfig)


def _key(name: str, where: str, valid: dict[str, Any], path: Path) -> str:
    key = ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
    if key not in valid:
        choices = sorted(valid)
        raise NormzooError(f"{path}: unknown key '{name}' in {where}{did_you_mean(key, choices)}; valid: "
                           f"{', '.join(choices)}")
    return key


def _check(value: Any, hint: Any, key: str, where: str, path: Path) -> Any:
    from normzoo.config import _fits, _type_name

    if not _fits(value, hint):
        raise NormzooError(f"{path}: '{key}' in {where} must be {_type_name(hint)}, got {json.dumps(value)[:60]}")
    return float(value) if hint in (float, float | None) and isinstance(value, int) else value


def run_options(table: dict[str, Any], path: Path, where: str, *, for_sweep: bool = False) -> dict[str, Any]:
    """RunConfig field values from a TOML table, each checked against the field's type."""
    fields = _run_fields()
    if for_sweep:  # the sweep names each run's folder itself
        fields = {k: v for k, v in fields.items() if k not in ("out", "run_name")}
    values = {}
    for name, value in table.items():
        key = _key(name, where, fields, path)
        values[key] = _check(value, fields[key], key, where, path)
    return values


def read_run_file(path: str | Path) -> dict[str, Any]:
    """The ``normzoo run`` options of a run file (TOML) or a run folder's ``config.json``."""
    path = Path(path)
    if path.suffix == ".json":
        from normzoo.config import RunConfig

        config = RunConfig.load(path)  # a run folder's config: every field, checked
        return dataclasses.asdict(config)
    data = read_toml(path)
    if "grid" in data:
        raise NormzooError(f"{path} has a [grid]: it is an experiment for 'normzoo sweep {path}', not a run")
    table = data.get("run", data)
    if not isinstance(table, dict) or any(isinstance(v, dict) for v in table.values()):
        raise NormzooError(f"{path}: a run file holds run options at the top level or under [run], nothing else")
    return run_options(table, path, "[run]" if "run" in data else "the file")


def read_experiment(path: str | Path) -> Experiment:
    """An experiment file's four tables, every key and type checked."""
    path = Path(path)
    data = read_toml(path)
    unknown = [k for k in data if k not in TABLES]
    if unknown:
        raise NormzooError(f"{path}: unknown table or key '{unknown[0]}'{did_you_mean(unknown[0], TABLES)}; an "
                           f"experiment file has the tables {', '.join(f'[{t}]' for t in TABLES)}")
    for table in TABLES:
        if not isinstance(data.get(table, {}), dict):
            raise NormzooError(f"{path}: '{table}' must be a table ([{table}])")
    experiment = Experiment(path, run=run_options(data.get("run", {}), path, "[run]", for_sweep=True))
    fields = {k: v for k, v in _run_fields().items() if k not in ("out", "run_name", "probes", "loggers")}
    for name, values in data.get("grid", {}).items():
        key = _key(name, "[grid]", fields, path)
        if not isinstance(values, list) or not values:
            raise NormzooError(f"{path}: '{name}' in [grid] must be a non-empty list of values")
        if key in experiment.run:
            raise NormzooError(f"{path}: '{name}' is in both [grid] and [run]")
        experiment.grid[key] = [_check(v, fields[key], key, "[grid]", path) for v in values]
    for table, keys in (("sweep", SWEEP_KEYS), ("report", REPORT_KEYS)):
        for name, value in data.get(table, {}).items():
            key = _key(name, f"[{table}]", keys, path)
            getattr(experiment, table)[key] = _check(value, keys[key], key, f"[{table}]", path)
    return experiment
