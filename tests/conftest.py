"""Shared fixtures. Tests run on CPU with tiny models; GPU-only tests are marked ``cuda`` and skip without one."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels can only run in Triton's interpreter, which must be chosen before Triton's first
# import: set here, the interpreted kernel tests run in this session, spread over the workers like any other.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from normzoo.plugins import get_plugins, reset_plugins  # noqa: E402

# Under pytest-xdist every worker gets one thread: two workers spinning two OpenMP threads each on two cores
# make tiny float64 ops (gradcheck) tens of times slower.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def fresh_plugins(monkeypatch):
    """A freshly loaded plugin manager, discarded after the test (so inline plugins never leak)."""
    monkeypatch.delenv("NORMZOO_STRICT_PLUGINS", raising=False)
    reset_plugins()
    yield get_plugins()
    reset_plugins()


def pytest_collection_modifyitems(config, items):
    # The slow tests first: spread over the workers early, the many short ones then even out the end (with the slow
    # ones last, in file order, one worker ran them alone for minutes while the other had finished).
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    spread_slow_tests(items, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def spread_slow_tests(items: list, workers: int) -> None:
    """Deal the slow tests (slow first in ``items``) to the first blocks of pytest-xdist's ``load`` schedule, whole
    modules at a time (their module fixtures are then made once), so that every worker starts with its share.

    The scheduler hands each worker a block of consecutive tests first, a quarter of its share, then more on demand:
    left together, the slow tests all fell in the first worker's block, which ran them one after another for five
    minutes. Another scheduler only sees a different order.
    """
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if workers < 2 or not slow:
        return
    block = max(2, len(items) // workers // 4)
    modules: dict[str, list] = {}
    for item in slow:
        modules.setdefault(item.module.__name__, []).append(item)
    shares: list[list] = [[] for _ in range(workers)]
    for index, module in enumerate(modules.values()):
        shares[index % workers] += module
    if max(map(len, shares)) > block:
        return
    rest = items[len(slow):]
    dealt = []
    for share in shares:
        dealt += share + rest[:block - len(share)]
        rest = rest[block - len(share):]
    items[:] = dealt + rest


def install_fake_distribution(root: Path, dist: str, module: str, source: str, ep_name: str | None = None) -> None:
    """Write a real (if minimal) installed distribution: a module plus a .dist-info with an entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(f"[normzoo]\n{ep_name or dist} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch, fresh_plugins):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("nz_test_")]:
        del sys.modules[name]


class NormzooProcess:
    """``normzoo ARGS`` as a process forked from this test process, with ``Popen``'s interface for what tests use.

    The child is a real process (its own pid and session, signals, exit status, stdout and stderr through pipes)
    that starts where a fresh ``python -m normzoo`` would be after importing torch: seconds sooner on 2 cores. Tests
    of start-up itself, and of ``python -m normzoo``, start fresh interpreters instead.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        from normzoo.forked_run import fork_cli

        self._out, out = os.pipe()
        self._err, err = os.pipe()
        environ = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
        try:
            self._process = fork_cli(args, stdout=out, stderr=err, env=environ, replace_env=True)
        finally:
            os.close(out), os.close(err)
        self.pid = self._process.pid
        self.args = ["normzoo", *args]

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def poll(self) -> int | None:
        return self._process.poll()

    def send_signal(self, signum: int) -> None:
        self._process.send_signal(signum)

    def kill(self) -> None:
        self.send_signal(9)

    def communicate(self, timeout: float = 300) -> tuple[str, str]:
        """Both outputs to their end, then the exit status; ``subprocess.TimeoutExpired`` after ``timeout`` s."""
        import selectors
        import subprocess
        import time

        deadline = time.monotonic() + timeout

        def time_left() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise subprocess.TimeoutExpired(self.args, timeout)
            return left

        chunks: dict[int, list[bytes]] = {self._out: [], self._err: []}
        with selectors.DefaultSelector() as selector:
            for fd in chunks:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                for key, _ in selector.select(min(time_left(), 1.0)):
                    data = os.read(key.fd, 65536)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        selector.unregister(key.fd)
                        os.close(key.fd)
        while self.poll() is None:
            time_left()
            time.sleep(0.02)
        return tuple(b"".join(chunks[fd]).decode(errors="replace") for fd in (self._out, self._err))  # type: ignore


def start_normzoo(args: list[str], env: dict[str, str] | None = None, *, fresh: bool = False):
    """``normzoo ARGS`` with stdout and stderr piped: forked (:class:`NormzooProcess`), or with ``fresh`` a new
    ``python -m normzoo`` (for a test process connected to Ray, which must not be forked)."""
    if not fresh:
        return NormzooProcess(args, env)
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "normzoo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"})


def run_normzoo(args: list[str], env: dict[str, str] | None = None, timeout: float = 300, *, fresh: bool = False):
    """``subprocess.run(["normzoo", *args], capture_output=True, text=True)``, as :func:`start_normzoo` starts it."""
    import subprocess

    process = start_normzoo(args, env, fresh=fresh)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
