"""``normzoo sweep --executor slurm``: each run is one SLURM job, submitted through submitit.

A job runs exactly the command the local executor would (``python -m normzoo run ...`` with the sweep's own Python)
as a child process on its node, output appended to the run's ``run.log`` (:class:`normzoo.sweep_node.RunProcess`).
So the sweep folder, that Python environment and the data must be at the same paths on every node: a shared
filesystem. Everything else (what to run, skip or resume, ``sweep.csv``, failure isolation) is the
:class:`normzoo.sweep.Sweep`'s, as for local and Ray runs.

Time limit and pre-emption: submitit asks SLURM for a signal (``USR2``) 90 s before a job's time limit, and SLURM
sends ``SIGTERM`` to a job it pre-empts. Either makes the job's run save a checkpoint and exit, and the job requeue
itself through submitit's checkpoint mechanism (:meth:`SlurmRun.checkpoint`); the requeued job resumes the run.
The sweep's own stop (Ctrl-C) is also a ``SIGTERM``: the job tells it apart by a file the sweep writes first, and
then ends instead of requeueing. submitit is imported only here, and only when asked for: the extra
``normzoo[slurm]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normzoo.errors import NormzooError
from normzoo.lock import RunLock
from normzoo.rundir import RunDir
from normzoo.sweep import (RUN_LOG, Ended, PlannedRun, command_text, default_gpus, describe_requests, import_extra,
                           node_env)
from normzoo.sweep_node import RunProcess

DEFAULT_TIME_MIN = 60
# submitit requeues a job that reaches its time limit this many times at most (pre-emptions do not count); a run
# that needs more chunks than that ends as interrupted, and the same sweep command resumes it.
TIME_LIMIT_REQUEUES = 50
TIME_FORMS = "minutes (90) or a SLURM time: MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


def import_submitit() -> Any:
    """The ``submitit`` module, or the one-line error that says how to install it."""
    return import_extra("submitit", "submitit", executor="slurm")


def slurm_minutes(text: str | int) -> int:
    """``--time`` in whole minutes (seconds round up): minutes, or a time as SLURM writes it (``2-00:00:00``).

    submitit counts a job's time in minutes (to tell a time limit from a pre-emption), so a SLURM time string is
    converted here rather than passed through."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise NormzooError(f"--time {text!r} is not a time limit: give {TIME_FORMS}")
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = ((days * 24 + first) * 60 + (second or 0)) * 60 + (third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = (first * 60 + second) * 60 + third
    else:  # MM or MM:SS
        seconds = first * 60 + (second or 0)
    if seconds < 60:
        raise NormzooError(f"--time {text!r} is shorter than a minute; a job needs time to start and checkpoint")
    return math.ceil(seconds / 60)


def whole(value: float | None, flag: str, low: int) -> int | None:
    """A CPU or GPU count SLURM can grant: a whole number, at least ``low``."""
    if value is None:
        return None
    if value != int(value) or value < low:
        raise NormzooError(f"{flag} {value:g} with --executor slurm: a SLURM job takes a whole number of them "
                           f"(at least {low}); fractions are for --executor ray")
    return int(value)


@dataclasses.dataclass
class SlurmRun:
    """The job of one run, as submitit pickles it: on the node, :meth:`__call__` runs the run; on the time-limit
    or pre-emption signal the run saves a checkpoint and submitit requeues the job with :meth:`checkpoint`'s copy.

    Signal handlers only note the signal; the loop of :class:`RunProcess` acts on it between polls.
    """

    command: list[str]  # as the sweep prepared it: start or resume
    resume: list[str]  # resumes the run from its checkpoint
    path: str  # the run folder
    cwd: str
    env: dict[str, str]
    stop_file: str  # written by the sweep before it asks its jobs to stop
    elapsed: float = 0.0  # seconds the job ran before it was requeued
    requeued: int = 0

    def __call__(self) -> tuple[int, float]:
        """Run the run; returns its exit code and the seconds this job ran, requeues included."""
        import submitit

        self.started = time.perf_counter()
        self.process = RunProcess(signal.SIGINT)
        self.signals: list[int] = []
        # submitit's handler for its signal checkpoints (through self.checkpoint) and requeues the job.
        requeue_signal = submitit.JobEnvironment._usr_sig()  # USR2 unless $SUBMITIT_PREEMPT_SIGNAL names another
        self.requeue_handler = signal.getsignal(requeue_signal)
        previous = {sig: signal.signal(sig, self.note) for sig in (signal.SIGTERM, requeue_signal)}
        try:
            if Path(self.stop_file).exists():  # the sweep was stopped while this job waited in the queue
                return 130, self.elapsed
            command = self.command_now()
            log = str(Path(self.path) / RUN_LOG)
            if command != self.command or self.requeued:
                with open(log, "ab") as out:
                    out.write(f"$ {command_text(command)}  # requeued\n".encode())
            # SLURM may send its signal to every process of the job: the run ignores the requeue signal (whose
            # default action would kill it) and a pre-emption's SIGTERM, and takes its stop request from this job,
            # as one SIGINT (a SIGTERM of its own as well would reach it once it had saved and restored its
            # handlers, and abort it).
            code, seconds = self.process.run(command, log, self.cwd, self.env,
                                             ignore=(requeue_signal, signal.SIGTERM), between=self.act)
            return code, self.elapsed + seconds
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def command_now(self) -> list[str]:
        """The sweep's command; or, when SLURM runs the job again (requeued), what the sweep itself would do with
        the folder: resume from its checkpoint, or start over a run killed before its first checkpoint."""
        folder = RunDir(self.path)
        if folder.has_checkpoint():
            return self.resume
        if self.command != self.resume and folder.has_run():
            return [*self.command, "--overwrite"]
        return self.command

    def note(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def act(self) -> None:
        """Between polls: a SIGTERM from the sweep (its stop file exists) is passed on to the run; any other signal
        is the time limit or a pre-emption, which submitit's handler turns into a checkpoint and a requeue."""
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGTERM and Path(self.stop_file).exists():
                self.process.request_stop()  # a second one aborts the run, as with local runs
            elif not self.process.requested and callable(self.requeue_handler):
                self.requeue_handler(signum, None)  # calls checkpoint(); requeues and exits, or raises
            elif not self.process.requested:  # not under submitit's handler: stop the run, at least
                self.process.request_stop()

    def checkpoint(self) -> Any:
        """submitit's checkpoint hook: the run saves a checkpoint and exits; the returned submission is what the
        requeued job runs (this job again, which then resumes the run: :meth:`command_now`)."""
        from submitit.helpers import DelayedSubmission

        process = getattr(self, "process", None)
        if process is not None and process.child is not None:
            if not process.requested:
                process.request_stop()
                process.pass_on()
            process.child.wait()
        ran = time.perf_counter() - getattr(self, "started", time.perf_counter())
        return DelayedSubmission(dataclasses.replace(self, elapsed=self.elapsed + ran, requeued=self.requeued + 1))

    def __getstate__(self) -> dict[str, Any]:
        # Only the fields: a requeued job starts afresh, without this job's process or handlers.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class SlurmExecutor:
    """Runs are SLURM jobs, submitted through submitit as soon as they are prepared, one array job per kind of
    request; SLURM starts each when the cluster has room, so all are "running" for the sweep.

    Each job requests ``cpus_per_run`` CPUs (and as many OpenMP threads), ``gpus_per_run`` GPUs (``None``: one for
    a run on CUDA, see :func:`normzoo.sweep.default_gpus`), ``time_min`` minutes, on ``partition`` (``None``: the
    cluster's default). submitit keeps its files (job scripts, pickles, the jobs' own logs) in ``folder``.
    ``cluster="local"`` runs each job as a local process with submitit's ``LocalExecutor``: a testing aid.
    """

    def __init__(self, folder: str | Path, *, partition: str | None = None, cpus_per_run: int = 1,
                 gpus_per_run: int | None = None, time_min: int = DEFAULT_TIME_MIN, cluster: str = "slurm") -> None:
        self.folder = Path(folder).absolute()
        self.partition, self.cpus, self.gpus, self.time_min, self.cluster = (partition, cpus_per_run, gpus_per_run,
                                                                             time_min, cluster)
        self.executor: Any = None
        self.stop_file = self.folder / f"stop-{uuid.uuid4().hex[:12]}"  # this sweep's, not an earlier one's
        self.queued: list[tuple[PlannedRun, SlurmRun]] = []  # started, to be submitted by flush()
        self.jobs: dict[Any, PlannedRun] = {}  # submitit Job -> run, for the jobs submitted and not yet reported
        self.stopped = False
        self.poll_s = 0.2 if cluster == "local" else 1.0

    def request(self, run: PlannedRun) -> tuple[int, int]:
        """(CPUs, GPUs) for one run's job."""
        return self.cpus, self.gpus if self.gpus is not None else default_gpus(run.options.get("device"))

    def describe(self, runs: Sequence[PlannedRun]) -> str:
        where = ("submitit's local executor (each job a process here: a testing aid)" if self.cluster == "local" else
                 f"partition {self.partition}" if self.partition else "the default partition")
        return (f"SLURM jobs of {describe_requests(map(self.request, runs))}, {self.time_min} min each, on {where}; "
                f"job files in {self.folder}")

    def __enter__(self) -> SlurmExecutor:
        submitit = import_submitit()
        if self.cluster == "local":
            self.executor = submitit.LocalExecutor(self.folder, max_num_timeout=TIME_LIMIT_REQUEUES)
        else:
            try:
                self.executor = submitit.SlurmExecutor(self.folder, max_num_timeout=TIME_LIMIT_REQUEUES)
            except RuntimeError:  # submitit's check for srun
                raise NormzooError("--executor slurm: no SLURM here (srun is not on PATH); run the sweep where "
                                   "sbatch works, a login node say") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.jobs:  # leaving early (an error): jobs left behind would go on with no sweep to record them
            self.stop()
            deadline = time.monotonic() + 30
            while self.jobs and time.monotonic() < deadline:
                self.wait(self.poll_s)
        if not self.jobs:
            self.stop_file.unlink(missing_ok=True)

    def has_room(self) -> bool:
        return True  # SLURM queues what does not fit yet

    def running(self) -> int:
        return len(self.queued) + len(self.jobs)

    def start(self, run: PlannedRun, command: list[str], log: Path, lock: RunLock | None = None) -> None:
        if lock is not None:  # the job runs on another node: it takes the folder's lock itself there
            lock.release()
        job = SlurmRun(command, run.resume_command(), str(run.path.absolute()), str(Path.cwd()), node_env(self.cpus),
                       str(self.stop_file))
        self.queued.append((run, job))

    def flush(self) -> None:
        """Submit what :meth:`start` queued: one array job per request (a SLURM array shares its resources)."""
        groups: dict[tuple[int, int], list[tuple[PlannedRun, SlurmRun]]] = {}
        for run, job in self.queued:
            groups.setdefault(self.request(run), []).append((run, job))
        self.queued = []
        for request, members in groups.items():
            self.executor.update_parameters(**self.parameters(request, members[0][0]))
            try:
                with self.executor.batch():
                    jobs = [self.executor.submit(job) for _, job in members]
            except Exception as exc:  # sbatch refused them: a partition that does not exist, a time too long
                lines = [line for line in str(exc).splitlines() if line.strip()]
                raise NormzooError(f"SLURM did not take the jobs: {lines[-1] if lines else type(exc).__name__}"
                                   ) from None
            self.jobs.update(zip(jobs, (run for run, _ in members)))

    def parameters(self, request: tuple[int, int], run: PlannedRun) -> dict[str, Any]:
        cpus, gpus = request
        if self.cluster == "local":  # a local process: no partition, and CPUs are not reserved
            return {"timeout_min": self.time_min, "gpus_per_node": gpus, "stderr_to_stdout": True}
        # None leaves a setting out of the job script (SLURM's default), rather than asking for 0 GPUs.
        return {"time": self.time_min, "cpus_per_task": cpus, "gpus_per_node": gpus or None,
                "partition": self.partition, "job_name": f"normzoo:{run.path.parent.name}", "stderr_to_stdout": True}

    def wait(self, timeout: float) -> list[Ended]:
        ended = [self.result(job) for job in list(self.jobs) if job.done()]
        if not ended:
            time.sleep(max(timeout, self.poll_s))
        return ended

    def result(self, job: Any) -> Ended:
        run = self.jobs.pop(job)
        if not job.paths.result_pickle.exists():  # cancelled, killed, or lost with its node: nothing to read
            if self.stopped:
                return Ended(run, 130, 0.0)
            return Ended(run, -1, 0.0, f"job {job.job_id} ended without a result ({job.state}); its log: "
                                       f"{job.paths.stdout}")
        try:
            code, seconds = job.result()
        except Exception as exc:  # the job itself raised: the last line of its traceback says why
            trace = str(exc).split("You can check full logs")[0]
            lines = [line.strip() for line in trace.splitlines() if line.strip().strip("-")]
            return Ended(run, -1, 0.0, f"job {job.job_id}: {lines[-1] if lines else type(exc).__name__}"[:300])
        return Ended(run, code, seconds)

    def stop(self) -> None:
        """Each job's run saves a checkpoint and the job ends (a second call aborts them); queued jobs are
        cancelled, as Ray drops its queued tasks."""
        self.stopped = True
        self.stop_file.parent.mkdir(parents=True, exist_ok=True)
        self.stop_file.touch()  # before the signal: the jobs must not take it for a pre-emption
        if self.cluster == "local":
            for job in self.jobs:
                # The local job's controller passes SIGTERM on to the job (LocalJob.cancel would kill it in 1 s).
                if job._process is not None and job._process.poll() is None:
                    job._process.send_signal(signal.SIGTERM)
            return
        ids = [str(job.job_id) for job in self.jobs]
        if ids:  # pending first: a job that starts meanwhile is then signalled as a running one
            subprocess.run(["scancel", "--state=PENDING", *ids], capture_output=True, check=False)
            subprocess.run(["scancel", "--signal=TERM", "--state=RUNNING", *ids], capture_output=True, check=False)
