"""A sweep's CPU runs as forks of the sweep process, which has imported torch and normzoo's run code once.

A fresh ``python -m normzoo run`` spends about 5 s on a 2-core machine importing torch before it trains; a sweep of
tiny CPU runs spent most of its time there. A forked child starts with everything already imported and is otherwise
the process ``subprocess.Popen`` would have started: its own session, stdin from ``/dev/null``, stdout and stderr
appended to the run's ``run.log``, the slot's environment, the run folder's lock handed down as its descriptor,
Python's default signal handlers, and an exit status the sweep reads as a ``Popen``'s (``-N`` for signal ``N``).

Only CPU sweeps fork: CUDA cannot be used in the child of a process that has initialized it, and a GPU run's start-up
is small next to its training. ``NORMZOO_FORK_RUNS=0`` turns forking off (every run a fresh interpreter).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

FORK_ENV = "NORMZOO_FORK_RUNS"


def runs_fork(device: str) -> bool:
    """Whether runs on ``device`` (a run's ``--device``) are forked: on the CPU, where ``os.fork`` exists."""
    if not hasattr(os, "fork") or os.environ.get(FORK_ENV, "1") == "0":
        return False
    if device == "cpu":
        return True
    if device != "auto":
        return False
    import torch

    return not torch.cuda.is_available()  # true on a machine without CUDA, where nothing is initialized


def prepare_parent() -> None:
    """Before the sweep makes its progress bar: no tqdm monitor thread, which takes tqdm's lock now and then (a fork
    at that moment would leave the child's copy of the lock held forever)."""
    import tqdm

    tqdm.tqdm.monitor_interval = 0


def preload() -> None:
    """Import, in the sweep, what every run imports: torch, the training loop and the plugins' registry."""
    import normzoo.runner  # noqa: F401  (torch, the training loop, the data and models it builds)
    from normzoo.plugins import get_plugins

    get_plugins()


class ForkedProcess:
    """The part of ``subprocess.Popen``'s interface a sweep uses, for a forked child."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)


def fork_run(command: Sequence[str], log: Path, env: Mapping[str, str]) -> ForkedProcess:
    """Start ``command`` (``[python, "-m", "normzoo", ...]``) as a forked child; see the module's text."""
    out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        return fork_cli(command[command.index("normzoo") + 1:], stdout=out, stderr=out, env=env)
    finally:
        os.close(out)


def fork_cli(args: Sequence[str], *, stdout: int, stderr: int, env: Mapping[str, str],
             replace_env: bool = False) -> ForkedProcess:
    """``normzoo ARGS`` in a forked child whose output goes to the descriptors ``stdout`` and ``stderr``.

    ``env`` is added to the inherited environment, or replaces it with ``replace_env`` (as ``Popen``'s ``env``).
    """
    sys.stdout.flush(), sys.stderr.flush()  # what the parent printed must not be printed again by the child
    pid = os.fork()
    if pid == 0:
        _child(list(args), stdout, stderr, env, replace_env)
    return ForkedProcess(pid)


def exit_with(body: Callable[[], object]) -> NoReturn:
    """End a forked child after ``body()``, with the status Python's own exit would give (0, a ``SystemExit``'s
    code, or 1 after printing an exception's traceback): output flushed, and nothing of the parent's run."""
    code = 1
    try:
        body()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _child(args: list[str], out: int, err: int, env: Mapping[str, str], replace_env: bool) -> NoReturn:
    exit_with(lambda: _cli_in_child(args, out, err, env, replace_env))


def _cli_in_child(args: list[str], out: int, err: int, env: Mapping[str, str], replace_env: bool) -> None:
    os.setsid()
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0), os.dup2(out, 1), os.dup2(err, 2)
    for fd in {stdin, out, err} - {0, 1, 2}:  # the copies on 0-2 are the child's; its runs must not hold these
        os.close(fd)
    # The parent's sys.stdout may not be its descriptor 1 (pytest's capture, a notebook's stream).
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                                       closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                                       closefd=False)
    if replace_env:
        os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import torch

    # The OpenMP runtime read OMP_NUM_THREADS when the parent imported torch: the child's value is set here.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    from normzoo.cli import main

    main(args)
