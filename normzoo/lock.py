"""An exclusive claim on a run folder, so that two processes never write one run.

``run.lock`` in the run folder is held with ``flock`` for as long as the owning process works on the run, and
holds that process's pid, host, start time and command as JSON (to say who has it). The kernel drops an
``flock`` when its process dies, however it dies (SIGKILL included), so a lock file left behind by a dead
process is recognised as stale and taken over; no timeout or pid guessing is needed. On NFS, Linux maps
``flock`` to POSIX byte-range locks, which the server arbitrates between hosts.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from normzoo.errors import NormzooError

LOCK_FILE = "run.lock"
# A sweep hands a run's lock to the run's process: the open lock file is inherited under this descriptor number.
INHERITED_FD_ENV = "NORMZOO_RUN_LOCK_FD"
BUSY_RETRY_S = 1.0  # how long a writer keeps trying a lock that is held (holder_of holds one for an instant)


class RunLocked(NormzooError):
    """The run folder is being written by another live process."""

    exit_code = 75  # EX_TEMPFAIL: try again later; sweeps skip such a run instead of calling it failed

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path, self.holder = path, holder
        super().__init__(f"{path} is being written by {describe_holder(holder)}; wait for it to finish or stop "
                         "that process (a run folder has one writer at a time)")


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h since 2026-12-01 12:00:00 (normzoo run ...)`` from a lock file's contents."""
    if not holder:
        return "another process"
    since = holder.get("started")
    when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if isinstance(since, (int, float)) \
        else ""
    command = f" ({str(holder['command'])[:120]})" if holder.get("command") else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}{command}"


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock or raises :class:`RunLocked` naming the holder.

    ``stale`` tells, after acquiring, whom a lock file left by a dead process named (None if there was none).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        fd = self._inherited()
        if fd is not None:  # the sweep that started this process held the lock for it, and still does through us
            return self._own(fd)
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _flock(fd):
                holder = _read(fd)
                os.close(fd)
                if time.monotonic() < deadline:  # perhaps only a sweep looking (holder_of) for a moment
                    time.sleep(0.05)
                    continue
                raise RunLocked(self.folder, holder)
            # The holder before us may have removed the file after we opened it: then we locked a file nobody
            # else will ever look at, so start over on the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.stale = _read(fd) or None
        return self._own(fd)

    def _own(self, fd: int) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def _inherited(self) -> int | None:
        """The lock file's descriptor a parent passed down (``INHERITED_FD_ENV``), if it is this folder's lock."""
        text = os.environ.get(INHERITED_FD_ENV)
        if not text:
            return None
        try:
            fd = int(text)
            mine, theirs = os.fstat(fd), os.stat(self.path)
        except (ValueError, OSError):
            return None
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            return None
        del os.environ[INHERITED_FD_ENV]  # for this process alone, not for processes it starts
        return fd

    def hand_over(self) -> dict[str, str]:
        """Let a child process take the lock over: the environment to give it, with ``pass_fds=(lock.fd,)``.

        After starting the child, call :meth:`detach`: the lock then lives on in the child alone.
        """
        if self.fd is None:
            raise RuntimeError("hand_over() of a lock that is not held")
        os.set_inheritable(self.fd, True)
        return {INHERITED_FD_ENV: str(self.fd)}

    def detach(self) -> None:
        """Close this process's handle without releasing the lock a child now holds through its own."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still holding it: a process that opened it retries on the new file
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_of(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds ``folder``'s lock now (its lock file's contents), or None when nobody does.

    Looks without taking over: a free lock is only tried for an instant (writers retry for a moment), never
    written or removed.
    """
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return None if _flock(fd) else _read(fd)
    finally:
        os.close(fd)  # drops the instant's lock, if it got one


def _flock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False when another open file holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _read(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
