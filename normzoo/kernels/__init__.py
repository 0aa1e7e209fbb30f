"""Fused Triton kernels for the zoo's own batch norms, behind PyTorch custom ops.

The batch "scale" norms (``lp`` for any p, centered or not, ``l1-bn``, ``topk-bn``) and ``noisy-bn`` reach their
CUDA kernels through custom ops (``normzoo::batch_scale_norm``, ``normzoo::noisy_batch_norm``,
``normzoo::channel_noise``, see :mod:`normzoo.kernels.ops`) that ``torch.compile`` traces as single graph nodes and
CUDA graphs capture. The passes are the ones cuDNN's batch norm makes: one per-channel statistics pass and one
normalize pass forward, one reduction pass and one elementwise pass backward, statistics in float32 whatever the
input dtype, NCHW and channels_last read in place.

Files, one concept each: :mod:`~normzoo.kernels.tiling` (how a kernel tiles an (N, C, H·W) tensor, and the layout
of the small buffers between kernels; no Triton), :mod:`~normzoo.kernels.common` (Triton helpers),
:mod:`~normzoo.kernels.stats` (forward statistics and normalize kernels), :mod:`~normzoo.kernels.grad` (backward
kernels), :mod:`~normzoo.kernels.topk` (exact per-channel top-k by threshold selection), :mod:`~normzoo.kernels.noise`
(Algorithm 1's noise from Philox), :mod:`~normzoo.kernels.scale_norm` (the launchers: which kernels run in which
order, noisy-bn's included), :mod:`~normzoo.kernels.ops` (the custom ops and their dispatch),
:mod:`~normzoo.kernels.precompile` (compiling without running: ahead of time, or for a GPU that is not there).

Triton is imported only when a kernel is first launched: ``import normzoo`` never imports it. The eager
implementations in :mod:`normzoo.norms` stay the reference, and the path taken on CPU and wherever Triton is missing.
``NORMZOO_KERNELS=eager`` in the environment turns the kernels off (the eager path on CUDA too, for comparisons).

Tests run every kernel on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, see
:func:`interpreting`), against the eager reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

# Whether Triton is installed (a lookup, not an import: importing it costs start-up time).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
ENABLED = TRITON_INSTALLED and os.environ.get("NORMZOO_KERNELS", "").lower() not in ("eager", "0", "off")
_interpret_cpu = 0  # > 0 inside interpreting(): CPU tensors take the Triton path through the interpreter


def use_triton(t: torch.Tensor) -> bool:
    """Whether the custom ops run ``t`` through the Triton kernels (CUDA, or CPU inside :func:`interpreting`)."""
    return ENABLED and (t.is_cuda or (_interpret_cpu > 0 and t.device.type == "cpu"))


@contextlib.contextmanager
def interpreting() -> Iterator[None]:
    """Run the kernels on CPU tensors with Triton's interpreter inside this block (tests).

    ``TRITON_INTERPRET=1`` must be in the environment before the kernel modules are imported: Triton decides at
    ``@triton.jit`` time whether a function is interpreted.
    """
    global _interpret_cpu
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("normzoo.kernels.interpreting() needs TRITON_INTERPRET=1 set before Triton is used")
    _interpret_cpu += 1
    try:
        yield
    finally:
        _interpret_cpu -= 1
