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
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
