"""What a cluster executor runs on the node for one run: its ``normzoo run`` command as a child process, output
appended to the run's log, stop requests passed on to it as a signal.

Shared by the Ray task (:mod:`normzoo.sweep_ray`) and the SLURM job (:mod:`normzoo.sweep_slurm`). Standard library
only: Ray takes this module to its workers by value, so a worker's Python needs Ray, not normzoo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

POLL_S = 0.2


class RunProcess:
    """One run's process on the node, and the stop requests for it.

    :meth:`request_stop` only counts (it is what signal handlers call); the loop in :meth:`run` passes each
    request on to the run as one ``signum`` once the run has started, so nothing is done inside a signal handler
    and a request that comes while the run is starting is not lost. The first request makes the run save a
    checkpoint and exit 130, a second aborts it.
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum
        self.child: subprocess.Popen[bytes] | None = None
        self.requested = 0  # stop requests received
        self.sent = 0  # of which passed on to the run

    def request_stop(self, signum: int = 0, frame: Any = None) -> None:
        self.requested += 1

    def pass_on(self) -> None:
        while self.child is not None and self.sent < self.requested:
            self.sent += 1
            self.child.send_signal(self.signum)

    def run(self, command: Sequence[str], log: str, cwd: str, env: dict[str, str], *,
            ignore: Sequence[int] = (), between: Callable[[], None] | None = None) -> tuple[int, float]:
        """Run ``command`` to its end; returns its exit code and seconds. ``ignore``: signals the run ignores
        (inherited as ignored through exec); ``between``: called between polls, outside any signal handler."""
        started = time.perf_counter()
        with open(log, "ab") as out:
            # Its own session: no terminal signal reaches it except through the executor.
            self.child = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=cwd, env={**os.environ, **env},
                                          start_new_session=True,
                                          preexec_fn=(lambda: ignore_signals(ignore)) if ignore else None)
        # Polling, not wait(): Ray's cancel calls the handler without a real signal, so it runs only between
        # Python calls; and `between` must run while the run goes on.
        while (code := self.child.poll()) is None:
            self.pass_on()
            if between is not None:
                between()
            time.sleep(POLL_S)
        return code, time.perf_counter() - started


def ignore_signals(signums: Sequence[int]) -> None:
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)
