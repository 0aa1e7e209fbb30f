"""``normzoo sweep --executor ray``: each run is one Ray task that requests the CPUs and GPUs it needs.

The task runs exactly the command the local executor would (``python -m normzoo run ...`` with the sweep's own
Python) as a subprocess on the node Ray picks, its output appended to the run's ``run.log``. So the sweep folder,
that Python environment and the data must be at the same paths on every node: a shared filesystem. Everything
else (what to run, skip or resume, ``sweep.csv``, failure isolation) is the :class:`normzoo.sweep.Sweep`'s, the same
as for local runs. Ray is imported only here, and only when asked for; it is the optional extra ``normzoo[ray]``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normzoo import sweep_node
from normzoo.errors import NormzooError
from normzoo.lock import RunLock
from normzoo.sweep import Ended, PlannedRun, default_gpus, describe_requests, import_extra, node_env
from normzoo.sweep_node import RunProcess


def import_ray() -> Any:
    """The ``ray`` module, or the one-line error that says how to install it."""
    # Under `uv run`, Ray would ship the working directory to the cluster and start its workers with `uv run` in a
    # fresh environment per job. A task here only starts the sweep's own Python, so that would be pure cost.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    return import_extra("ray", "Ray", executor="ray")


def run_logged(command: list[str], log: str, cwd: str, env: dict[str, str]) -> tuple[int, float]:
    """The Ray task: run one ``normzoo run`` command, output appended to ``log``; returns its exit code and seconds.

    ``ray.cancel`` interrupts a running task by calling its SIGINT handler, which passes it on as a SIGTERM: the
    first makes the run save a checkpoint and exit as interrupted, a second aborts it (as with local runs).
    """
    process = RunProcess(signal.SIGTERM)
    previous = signal.signal(signal.SIGINT, process.request_stop)
    try:
        return process.run(command, log, cwd, env)
    finally:
        signal.signal(signal.SIGINT, previous)


def check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Fail in seconds when a ``HOST:PORT`` (or ``ray://HOST:PORT``) address takes no connection at all:
    ``ray.init`` keeps retrying such an address for many minutes before it gives up."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # None, "auto", "local": Ray finds (or starts) the cluster itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise NormzooError(f"could not connect to Ray at {address}: nothing accepts connections on "
                           f"{host}:{port} ({exc.strerror or exc}); is the cluster up (ray start --head)?") from None


class RayExecutor:
    """Runs are Ray tasks; all are submitted at once and Ray starts each when a node has its resources free.

    ``address`` is what ``ray.init`` takes (``None``: ``$RAY_ADDRESS``, else a new local instance). Each run
    requests ``cpus_per_run`` CPUs (and as many OpenMP threads) and ``gpus_per_run`` GPUs (``None``: one for a run
    that trains on CUDA, see :func:`default_gpus`); Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigns.
    """

    def __init__(self, *, address: str | None = None, cpus_per_run: float = 1.0,
                 gpus_per_run: float | None = None) -> None:
        self.address, self.cpus, self.gpus = address, cpus_per_run, gpus_per_run
        self.ray: Any = None
        self.task: Any = None
        self.connected_here = False
        self.tasks: dict[Any, PlannedRun] = {}  # ObjectRef -> run, for the runs submitted and not yet reported

    def request(self, run: PlannedRun) -> dict[str, float]:
        gpus = self.gpus if self.gpus is not None else default_gpus(run.options.get("device"))
        return {"num_cpus": self.cpus, "num_gpus": gpus}

    def describe(self, runs: Sequence[PlannedRun]) -> str:
        each = describe_requests((r["num_cpus"], r["num_gpus"]) for r in map(self.request, runs))
        env = os.environ.get("RAY_ADDRESS")
        where = (f"Ray at {env}" if env and self.address in (None, "auto") else
                 f"Ray at {self.address}" if self.address else "a new local Ray instance")
        return f"Ray tasks of {each} each, on {where}"

    def __enter__(self) -> RayExecutor:
        ray = self.ray = import_ray()
        if not ray.is_initialized():  # a Python caller may have connected already: use that connection
            check_reachable(self.address or os.environ.get("RAY_ADDRESS"))
            try:
                ray.init(address=self.address, log_to_driver=False)
            except Exception as exc:  # a wrong address or a cluster that is down: one line, not a traceback
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                raise NormzooError(f"could not connect to Ray ({self.address or 'local'}): {first}") from None
            self.connected_here = True
        # By value, not by reference: a worker's Python then needs Ray only, not normzoo.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.cloudpickle.register_pickle_by_value(sweep_node)
        self.task = ray.remote(run_logged)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tasks:  # leaving early (an error): runs left behind would go on with no sweep to record them
            self.stop()
            self.ray.wait(list(self.tasks), num_returns=len(self.tasks), timeout=30)
        if self.connected_here:
            self.ray.shutdown()

    def has_room(self) -> bool:
        return True  # Ray queues what does not fit yet

    def flush(self) -> None:
        pass  # start() submitted each run already

    def running(self) -> int:
        return len(self.tasks)

    def start(self, run: PlannedRun, command: list[str], log: Path, lock: RunLock | None = None) -> None:
        if lock is not None:  # the run may start on another node: it takes the folder's lock itself there
            lock.release()
        env = node_env(self.cpus)
        # No retries: a retried task would start the run over on a half-written folder. A lost run is recorded as
        # failed instead, and --retry-failed resumes it from its checkpoint.
        options = {**self.request(run), "max_retries": 0, "name": f"normzoo-run:{run.name}"}
        ref = self.task.options(**options).remote(command, str(log.absolute()), os.getcwd(), env)
        self.tasks[ref] = run

    def wait(self, timeout: float) -> list[Ended]:
        if not self.tasks:
            return []
        ready, _ = self.ray.wait(list(self.tasks), num_returns=1, timeout=timeout)
        return [self.result(ref) for ref in ready]

    def result(self, ref: Any) -> Ended:
        run, exceptions = self.tasks.pop(ref), self.ray.exceptions
        try:
            code, seconds = self.ray.get(ref)
        except exceptions.TaskCancelledError:  # cancelled before it started: stopped, like an interrupted run
            return Ended(run, 130, 0.0)
        except exceptions.RayError as exc:  # the worker or its node was lost: the run's log cannot say so
            first = (str(exc).strip().splitlines() or [""])[0]
            return Ended(run, -1, 0.0, f"{type(exc).__name__}: {first}"[:300])
        return Ended(run, code, seconds)

    def stop(self) -> None:
        for ref in self.tasks:
            self.ray.cancel(ref)
