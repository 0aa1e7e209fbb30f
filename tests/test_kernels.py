"""normzoo's kernels and custom ops as far as no interpreter is needed: ``torch.compile`` over vgg11 with every
built-in norm (no graph break), every kernel compiled for an sm_90 GPU without one, what importing normzoo costs,
and ``tests/test_kernels_interpreted.py`` (the kernels run by Triton's interpreter against the eager reference)
in a fresh process with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from normzoo import kernels
from normzoo.testing import sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not kernels.TRITON_INSTALLED, reason="Triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this session runs the interpreted tests itself")
def test_kernels_through_tritons_interpreter():
    """tests/test_kernels_interpreted.py in a fresh process: TRITON_INTERPRET=1 has to precede Triton's first
    import, which this session (with CUDA, it uses the compiled kernels) may already have made."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_kernels_interpreted.py"),
                             "-q", "-p", "no:xdist", "-p", "no:cacheprovider"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


# Each kind of layer once: torch's own norms, the power-mean (centered) and max scale ops, top-k, the noise op.
COMPILED_SPECS = ["bn", "gn", "noisy-bn", "lp:2,centered=true", "lp:inf", "topk-bn"]


@pytest.mark.parametrize("spec", COMPILED_SPECS)
def test_compiled_vgg11_has_no_graph_break(spec):
    """``torch.compile(fullgraph=True)`` over vgg11 with the norm traces forward and backward in one graph (the
    scale norms as one custom op per layer) and matches eager outputs and gradients (noisy-bn: it runs)."""
    from normzoo.models import build_model

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("vgg11,width=0.0625", spec, num_classes=10, in_chans=3).train()
    x, y = sample((4, 3, 32, 32)), torch.arange(4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    for forward in (compiled, model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    torch._dynamo.reset()
    if spec != "noisy-bn":  # the compiled graph draws its own random numbers
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(g).all() for g in results[0])


# -- the real compiler, and what importing normzoo costs --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not kernels.TRITON_INSTALLED, reason="Triton is not installed")
def test_every_kernel_compiles_for_sm90():
    """Triton's compiler (not the interpreter) accepts every kernel down to an sm_90 cubin, with no GPU: the plans
    that cover every kernel's flag values (in pairs), input dtypes and layouts, about 40 % of all specializations
    (``python -m normzoo.kernels.precompile --cover``; each costs half a second of CPU on a cold cache). One
    compiling process: the suite's workers already keep every core busy, and each process more is one more torch
    import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "normzoo.kernels.precompile", "--capability", "90", "--cover",
                             "--processes", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert re.search(r"kernel specializations compiled for sm_90 from \d+ plans \(covering all \d+\)", result.stdout)
    launched = re.findall(r"^def (\w+_kernel)\(", "".join(path.read_text()
                                                        for path in (ROOT / "normzoo" / "kernels").glob("*.py")), re.M)
    compiled = result.stdout.split("kernels:")[1].split()
    assert sorted(compiled) == sorted(launched) and len(launched) >= 9, (compiled, launched)
