"""Sweeps: the grid of runs behind one command, run into one folder, resumable.

Each run is a ``normzoo run`` process (``python -m normzoo run ... --out SWEEP --run-name NAME``; on the CPU a fork
of the sweep, see :mod:`normzoo.forked_run`), so a run that crashes, diverges or runs out of memory never takes the
sweep down, and its exact command is printed and kept in the run's ``sweep-run.json``. An executor runs those
commands: :class:`LocalExecutor` as child processes of the sweep, ``normzoo.sweep_ray.RayExecutor`` as Ray tasks,
``normzoo.sweep_slurm.SlurmExecutor`` as SLURM jobs; everything else here is the same for all of them. Re-running the
same sweep command looks at each run folder and skips finished (or diverged) runs, resumes interrupted ones from their
checkpoint, and leaves failed ones alone unless asked to retry them. ``sweep.csv`` is rewritten after every run, one
row per run.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from normzoo.errors import NormzooError
from normzoo.forked_run import ForkedProcess, fork_run, preload, prepare_parent, runs_fork
from normzoo.io import atomic_write_json
from normzoo.lock import RunLock, RunLocked, describe_holder, holder_of
from normzoo.rundir import SUMMARY_FIELDS, RunDir, write_csv

SWEEP_FILE = "sweep.json"
SWEEP_CSV = "sweep.csv"
RUN_RECORD = "sweep-run.json"  # in each run folder: the options, the command, and a failure if there was one
RUN_LOG = "run.log"  # in each run folder: the run's stdout and stderr
# Options that may change between invocations of the same sweep without making its runs different runs.
FREE_OPTIONS = {"device", "data_dir", "loggers"}


def split_specs(text: str) -> list[str]:
    """Split a comma list whose items may themselves be specs with ``,key=value`` parameters.

    A piece with ``=`` before any ``:`` continues the previous item, so
    ``"bn,lp:1,centered=true,gn:8"`` is ``["bn", "lp:1,centered=true", "gn:8"]``. ``;`` always separates.
    """
    items: list[str] = []
    for group in text.split(";"):
        specs: list[str] = []
        for piece in (p.strip() for p in group.split(",")):
            if piece and specs and "=" in piece.split(":")[0]:
                specs[-1] = f"{specs[-1]},{piece}"
            elif piece:
                specs.append(piece)
        items += specs
    return items


@dataclass
class PlannedRun:
    """One point of the grid: its folder name, its ``normzoo run`` options, and which of them vary."""

    name: str
    options: dict[str, Any]
    swept: dict[str, Any]
    path: Path = field(default=Path())

    def command(self, sweep_dir: Path) -> list[str]:
        return [sys.executable, "-m", "normzoo", "run", *option_args(self.options), "--out", str(sweep_dir),
                "--run-name", self.name, "--quiet"]

    def resume_command(self) -> list[str]:
        return [sys.executable, "-m", "normzoo", "run", "--resume", str(self.path), "--quiet"]

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.swept.items()) or self.name


def option_args(options: dict[str, Any]) -> list[str]:
    """``normzoo run`` arguments for a dict of run options (field names as in :class:`RunConfig`)."""
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if key in ("probes", "loggers"):
            for spec in value:
                args += ["--probe" if key == "probes" else "--log", spec]
        elif isinstance(value, bool):
            args.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif value is not None:
            args += [flag, str(value)]
    return args


def run_name(swept: dict[str, Any]) -> str:
    """A readable folder name from the varying options, e.g. ``norm-lp_inf__lr-0.1__seed-0``."""
    if not swept:
        return "run"
    parts = []
    for key, value in swept.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in text)
        parts.append(f"{key.replace('_', '-')}-{safe}")
    return "__".join(parts)


def plan(grid: dict[str, list[Any]], fixed: dict[str, Any]) -> list[PlannedRun]:
    """The cartesian product of ``grid`` (option -> values, in the given order) on top of ``fixed`` options."""
    for key, values in grid.items():
        if len(set(map(str, values))) != len(values):
            raise NormzooError(f"--{key.replace('_', '-')} lists a value twice: {', '.join(map(str, values))}")
    varying = [k for k, v in grid.items() if len(v) > 1]
    runs, names = [], {}
    for combo in itertools.product(*grid.values()):
        chosen = dict(zip(grid, combo))
        swept = {k: chosen[k] for k in varying}
        name = run_name(swept)
        if name in names:
            raise NormzooError(f"runs {names[name]} and {swept} would share the folder '{name}'")
        names[name] = swept
        runs.append(PlannedRun(name, {**chosen, **fixed}, swept))
    return runs


# -- the state of one run folder ---------------------------------------------------------------------------------
def read_record(path: Path) -> dict[str, Any]:
    """The run's ``sweep-run.json`` ({} before the sweep first starts it); a damaged one is a one-line error."""
    record_path = path / RUN_RECORD
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        return {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise NormzooError(f"{record_path} is not valid JSON ({exc}); delete it to let the sweep start that run "
                           "afresh") from None
    if not isinstance(record, dict) or not isinstance(record.get("options", {}), dict):
        raise NormzooError(f"{record_path} is damaged (not a JSON object with an 'options' object); delete it to "
                           "let the sweep start that run afresh")
    return record


def read_summary(path: Path) -> dict[str, str]:
    return RunDir(path).read_summary()


def run_state(path: Path, *, holding: bool = False) -> str:
    """``pending``, ``finished``, ``diverged``, ``locked`` (another process is writing it), ``failed``,
    ``interrupted`` (resumable) or ``started``; ``holding``: the caller holds the folder's lock itself.

    ``started`` is a run that was killed before its first checkpoint: it starts over.
    """
    run = RunDir(path)
    status = read_summary(path).get("status")
    if status in ("finished", "diverged"):
        return status
    if not holding and holder_of(path) is not None:
        return "locked"
    if status == "failed" or read_record(path).get("failed"):
        return "failed"
    if status == "interrupted" or run.has_checkpoint():
        return "interrupted"
    return "started" if run.config.exists() else "pending"


def check_same_options(run: PlannedRun) -> None:
    """A folder of this sweep must have been started with the options this invocation asks for."""
    before = read_record(run.path).get("options")
    if before is None:
        return
    changed = sorted(k for k in set(before) | set(run.options)
                     if k not in FREE_OPTIONS and before.get(k) != run.options.get(k))
    if changed:
        diff = ", ".join(f"--{k.replace('_', '-')} {before.get(k)!r} -> {run.options.get(k)!r}" for k in changed)
        raise NormzooError(f"{run.path} was started with other options ({diff}); use another --out, or delete "
                           f"that folder to rerun it")


# -- running -----------------------------------------------------------------------------------------------------
@dataclass
class Ended:
    """How one run's process ended, as its executor reports it."""

    run: PlannedRun
    code: int  # the exit code of ``normzoo run`` (negative: killed by that signal)
    seconds: float
    error: str = ""  # what the executor knows and the run's log cannot say (a lost Ray worker, say)


class Executor(Protocol):
    """How a sweep's runs are executed: :class:`LocalExecutor`, ``normzoo.sweep_ray.RayExecutor`` or
    ``normzoo.sweep_slurm.SlurmExecutor``.

    The :class:`Sweep` decides what runs, prepares each run folder and records how each run ended; an executor
    only runs ``normzoo run`` commands with their output appended to a log file, and says when they end. Used as a
    context manager around the whole sweep (connecting and disconnecting happen there).
    """

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...

    def describe(self, runs: Sequence[PlannedRun]) -> str:
        """Where and how many at once, for the first line of a sweep and for ``--dry-run``."""
        ...

    def has_room(self) -> bool:
        """Whether another run can be started now."""
        ...

    def start(self, run: PlannedRun, command: list[str], log: Path, lock: RunLock | None = None) -> None:
        """Start one run; ``lock`` (the run folder's, held by the sweep) is handed to the run's process where it
        can inherit it, so no other sweep can take the folder in between; otherwise it is simply released."""
        ...

    def running(self) -> int:
        """Runs started and not yet reported by :meth:`wait`."""
        ...

    def wait(self, timeout: float) -> list[Ended]:
        """The runs that ended since the last call, waiting up to ``timeout`` seconds when none has."""
        ...

    def stop(self) -> None:
        """Ask every running run to save a checkpoint and exit; a second call aborts them."""
        ...


@dataclass
class Slot:
    """A place for one concurrent run: its environment (GPU, CPU threads) and the process in it."""

    env: dict[str, str]
    run: PlannedRun | None = None
    process: subprocess.Popen[bytes] | ForkedProcess | None = None
    started: float = 0.0


def slot_environments(jobs: int, gpus: int, device: str) -> list[dict[str, str]]:
    """One GPU per job when several are present; otherwise CPU threads split evenly between the jobs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(max(1, cpus // jobs))
    envs = []
    for i in range(jobs):
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        if gpus > 1 and device in ("auto", "cuda"):
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        envs.append(env)
    return envs


class LocalExecutor:
    """Runs are child processes of the sweep, up to ``jobs`` at once, each in a :class:`Slot`.

    On the CPU they are forks of the sweep (:mod:`normzoo.forked_run`), which imports torch once for all of them;
    elsewhere each is a fresh ``python -m normzoo run``.
    """

    def __init__(self, jobs: int = 1, device: str = "auto") -> None:
        self.jobs, self.device = jobs, device
        self.slots: list[Slot] = []
        self.fork = False

    @classmethod
    def for_runs(cls, runs: Sequence[PlannedRun], jobs: int = 1) -> LocalExecutor:
        """``jobs`` slots for the device the runs ask for (a sweep's runs share their ``--device``)."""
        return cls(jobs, str(runs[0].options.get("device") or "auto") if runs else "auto")

    def __enter__(self) -> LocalExecutor:
        self.fork = runs_fork(self.device)
        if self.fork:
            prepare_parent()
        gpus = cuda_device_count() if self.jobs > 1 and not self.fork else 0
        self.slots = [Slot(env) for env in slot_environments(self.jobs, gpus, self.device)]
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def describe(self, runs: Sequence[PlannedRun]) -> str:
        return f"{self.jobs} at a time"

    def has_room(self) -> bool:
        return any(slot.process is None for slot in self.slots)

    def flush(self) -> None:
        pass  # start() started each run already

    def running(self) -> int:
        return sum(slot.process is not None for slot in self.slots)

    def start(self, run: PlannedRun, command: list[str], log: Path, lock: RunLock | None = None) -> None:
        slot = next(slot for slot in self.slots if slot.process is None)
        handed = lock.hand_over() if lock is not None else {}
        try:
            if self.fork:
                preload()  # at the first run: a CPU sweep with nothing left to run imports no torch
                slot.process = fork_run(command, log, {**slot.env, **handed})
            else:
                with log.open("ab") as out:
                    # Its own session: a Ctrl-C in the terminal reaches the sweep only, which passes it on as one
                    # SIGTERM.
                    slot.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, env={**os.environ, **slot.env, **handed},
                                                    start_new_session=True, pass_fds=(lock.fd,) if lock else ())
        finally:
            if lock is not None:
                lock.detach()  # the run's process holds the lock now (or, if it did not start, nobody does)
        slot.run, slot.started = run, time.perf_counter()

    def wait(self, timeout: float) -> list[Ended]:
        ended = []
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is not None:
                assert slot.run is not None
                ended.append(Ended(slot.run, slot.process.returncode, time.perf_counter() - slot.started))
                slot.run = slot.process = None
        if not ended:
            time.sleep(timeout)
        return ended

    def stop(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM)


class Sweep:
    """Runs a planned grid into ``out``: with ``executor``, or as local processes, up to ``jobs`` at once."""

    def __init__(self, runs: Sequence[PlannedRun], out: str | Path, *, jobs: int = 1, retry_failed: bool = False,
                 echo: Callable[[str], None] = print, definition: dict[str, Any] | None = None,
                 executor: Executor | None = None) -> None:
        self.out = Path(out)
        self.runs, self.retry_failed, self.echo = list(runs), retry_failed, echo
        self.definition = definition or {}
        for run in self.runs:
            run.path = self.out / run.name
        self.executor: Executor = executor or LocalExecutor.for_runs(self.runs, jobs)
        self.stopping = 0

    def todo(self) -> list[tuple[PlannedRun, str]]:
        """Runs to start or resume, after reporting the ones that are skipped and why."""
        todo, skipped = [], {"finished": 0, "diverged": 0, "failed": 0, "locked": 0}
        for run in self.runs:
            check_same_options(run)
            state = run_state(run.path)
            if state in ("finished", "diverged", "locked") or (state == "failed" and not self.retry_failed):
                skipped[state] += 1
                self.echo(f"skip   {run.label()}: {skip_reason(run.path, state)}")
            else:
                todo.append((run, state))
        if any(skipped.values()):
            self.echo("skipped " + ", ".join(f"{n} {s}" for s, n in skipped.items() if n) + " of "
                      f"{len(self.runs)} runs")
        return todo

    def launch(self, run: PlannedRun, state: str) -> bool:
        """Start (or resume) one run; False when another process took it since :meth:`todo` looked.

        The run folder's lock is taken here, held while the folder is prepared, and handed to the run's process,
        so that no other sweep (or ``normzoo run --resume``) can take the folder in between.
        """
        run.path.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunDir(run.path).claim()
        except RunLocked as exc:
            self.echo(f"skip   {run.label()}: {held_by(exc.holder)}")
            return False
        try:
            command = self.prepare(run)
        except BaseException:
            lock.release()
            raise
        if command is None:
            lock.release()
            return False
        self.executor.start(run, command, run.path / RUN_LOG, lock=lock)
        return True

    def prepare(self, run: PlannedRun) -> list[str] | None:
        """With the folder's lock held: the command that starts or resumes the run (None if it is done now)."""
        folder = RunDir(run.path)
        state = run_state(run.path, holding=True)  # as it is now that nobody else can change it
        if state in ("finished", "diverged"):  # done by another sweep meanwhile
            self.echo(f"skip   {run.label()}: {state}")
            return None
        record = read_record(run.path)
        resuming = state in ("interrupted", "failed") and folder.has_checkpoint()
        if resuming:
            command = run.resume_command()
        else:
            command = run.command(self.out)
            folder.remove_run_files()  # a run killed before its first checkpoint starts over
        record.update(options=run.options, command=command_text(run.command(self.out)), failed=None)
        atomic_write_json(run.path / RUN_RECORD, record)
        verb = "resume" if resuming else ("retry " if state == "failed" else "start ")
        self.echo(f"{verb} {run.label()}")
        with (run.path / RUN_LOG).open("ab") as log:
            log.write(f"$ {command_text(command)}\n".encode())
        return command

    def reap(self, ended: Ended) -> str:
        """Record how a run ended; returns its state."""
        run, code, seconds = ended.run, ended.code, ended.seconds
        record = read_record(run.path)
        record["wall_s"] = record.get("wall_s", 0.0) + seconds
        state = run_state(run.path)
        stopped_by_us = self.stopping and code in (130, -signal.SIGTERM, -signal.SIGINT)
        if code == RunLocked.exit_code:  # another process took the folder between our look and the run's start
            self.echo(f"skip   {run.label()}: {skip_reason(run.path, 'locked')}")
            return "locked"
        if code != 0 and state not in ("interrupted", "diverged", "finished") and not stopped_by_us:
            record["failed"] = {"returncode": code, "error": ended.error or last_error(run.path / RUN_LOG)}
            state = "failed"
        try:
            # Under the folder's lock: another sweep that claims the folder removes the temporary files it finds,
            # which would include this write's if it were in flight.
            with RunLock(run.path):
                atomic_write_json(run.path / RUN_RECORD, record)
        except RunLocked as exc:  # another sweep has taken the run up again: the record is its own to write
            self.echo(f"skip   {run.label()}: {held_by(exc.holder)}")
            return "locked"
        summary = read_summary(run.path)
        detail = f"test_acc {float(summary['test_acc']):.4f}" if summary.get("test_acc") else ""
        if state == "failed":
            detail = f"exit {code}: {record['failed']['error']} (log: {run.path / RUN_LOG})"
        self.echo(f"{state:<8} {run.label()}  {detail}  [{seconds:.0f}s]".rstrip())
        return state

    def stop(self, signum: int, _frame: Any) -> None:
        # Only counted here: the loop passes it on, so an executor never runs inside a signal handler.
        self.stopping += 1

    def execute(self, *, progress: bool = True) -> dict[str, int]:
        """Run everything still to do; returns the count of runs per final state."""
        from tqdm.auto import tqdm

        # The executor connects first: a cluster that is not there leaves no folder behind, and Ray's connection
        # installs its own SIGTERM handler, which ours then replaces.
        with self.executor as executor:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / SWEEP_FILE, self.definition | {"runs": [r.name for r in self.runs]})
            todo = self.todo()
            bar = tqdm(total=len(todo), unit="run", disable=not progress or not todo, file=sys.stderr,
                       dynamic_ncols=True)
            echo = self.echo
            self.echo = lambda text: bar.write(text, file=sys.stdout) if not bar.disable else echo(text)
            handlers = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                self.loop(executor, todo, bar)
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
                bar.close()
                self.echo = echo
        write_sweep_csv(self.out, self.runs)
        counts: dict[str, int] = {}
        for run in self.runs:
            state = run_state(run.path)
            counts[state] = counts.get(state, 0) + 1
        return counts

    def loop(self, executor: Executor, todo: list[tuple[PlannedRun, str]], bar: Any) -> None:
        passed_on = 0  # stop requests passed on to the executor
        while True:
            while todo and not self.stopping and executor.has_room():
                if not self.launch(*todo.pop(0)):
                    bar.update(1)
            executor.flush()
            while passed_on < self.stopping:
                # First signal: each run saves a checkpoint and exits; a second one aborts them.
                passed_on += 1
                self.echo("stopping: each running run saves a checkpoint (again to abort)" if passed_on == 1 else
                          "aborting")
                executor.stop()
            if not executor.running():
                break
            for ended in executor.wait(0.1):
                self.reap(ended)
                bar.update(1)
                write_sweep_csv(self.out, self.runs)


def skip_reason(path: Path, state: str) -> str:
    if state == "failed":
        return "failed (--retry-failed runs it again)"
    if state == "locked":
        return held_by(holder_of(path))
    return state


def held_by(holder: dict[str, Any] | None) -> str:
    return f"being written by {describe_holder(holder) if holder else 'another process'}"


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken CUDA install must not stop a CPU sweep
        return 0


# -- shared by the cluster executors (Ray, SLURM) -----------------------------------------------------------------
def import_extra(module: str, name: str, *, executor: str, extra: str | None = None) -> Any:
    """An optional dependency's module, or the one-line error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NormzooError(f"--executor {executor} needs {name}: pip install 'normzoo[{extra or executor}]'") from None


@functools.cache
def driver_sees_cuda() -> bool:
    return cuda_device_count() > 0


def default_gpus(device: str | None) -> int:
    """One GPU for a run that trains on CUDA: ``--device cuda[:n]``, or ``auto`` when this machine has CUDA."""
    device = device or "auto"
    return int(device.startswith("cuda") or (device == "auto" and driver_sees_cuda()))


def amount(n: float, unit: str) -> str:
    return f"{n:g} {unit}" + ("s" if n > 1 else "")


def describe_requests(requests: Iterable[tuple[float, float]]) -> str:
    """``1 CPU + 1 GPU`` for what each run requests (CPUs, GPUs), or ``1 CPU (2 runs), 2 CPUs (1 run)``."""
    texts = Counter(" + ".join(amount(n, unit) for n, unit in [(cpus, "CPU"), (gpus, "GPU")] if n or unit == "CPU")
                    for cpus, gpus in requests)
    return ", ".join(text + (f" ({amount(n, 'run')})" if len(texts) > 1 else "") for text, n in texts.items())


def node_env(cpus: float) -> dict[str, str]:
    """The environment a run gets on a node: OpenMP threads for its CPUs, and the sweep's settings for nodes that
    do not share the sweep's environment (a local instance has them anyway)."""
    env = {k: v for k, v in os.environ.items() if k.startswith("NORMZOO_") or k == "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = str(max(1, math.floor(cpus)))
    return env


def command_text(command: Sequence[str]) -> str:
    import shlex

    words = ["normzoo", *command[3:]] if command[1:3] == ["-m", "normzoo"] else list(command)
    return shlex.join(words)


def last_error(log: Path) -> str:
    """The last non-empty line of a run's log (the one-line error, or the exception of a traceback)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return ""
    return lines[-1][:300] if lines else ""


# -- sweep.csv ---------------------------------------------------------------------------------------------------
def sweep_rows(runs: Sequence[PlannedRun]) -> list[dict[str, Any]]:
    """One row per run: swept options, state, the run's summary, its probe summaries, time and error."""
    from normzoo.analysis import load_run, probe_summaries

    rows = []
    for run in runs:
        record = read_record(run.path)
        row: dict[str, Any] = {"run": run.name, **{f"opt_{k}": v for k, v in run.swept.items()}}
        row["state"] = run_state(run.path)
        row.update({k: v for k, v in read_summary(run.path).items() if k != "run"})  # its "run" is a path
        if RunDir(run.path).metrics.exists():
            loaded = load_run(run.path)
            row.update(probe_summaries(loaded.probes, loaded.config))
        row["wall_s"] = f"{record['wall_s']:.1f}" if "wall_s" in record else ""
        row["error"] = (record.get("failed") or {}).get("error", "")
        rows.append(row)
    return rows


def write_sweep_csv(out: Path, runs: Sequence[PlannedRun]) -> Path:
    rows = sweep_rows(runs)
    columns: list[str] = ["run"]
    for row in rows:
        columns += [k for k in row if k.startswith("opt_") and k not in columns]
    columns += ["state", *[f for f in SUMMARY_FIELDS if f != "run"]]
    for row in rows:
        columns += [k for k in row if k not in columns and k not in ("wall_s", "error")]
    columns += ["wall_s", "error"]
    return write_csv(out / SWEEP_CSV, columns, rows)
