"""Algorithm 1's noise (Santurkar et al. 2018) drawn inside the kernels from Philox, a counter-based generator.

Each noisy forward draws one int64 seed from torch's generator of the device (``normzoo.kernels.ops.noise_seed``:
one ``torch.randint`` call, so ``torch.manual_seed``, the runner's saved RNG state and CUDA graphs' per-replay RNG
offsets all apply). Every random number is then a pure function of (seed, counter) — Philox-4x32-10 gives four
uniforms per counter:

* channel j, counter −1 − j: ``µ_j = mu·(2u₁ − 1)``, ``σ_j = 1 + (sigma − 1)·u₂``;
* element (n, c, h, w) of the global batch, counter ``((n·C + c)·H + h)·W + w`` (the logical NCHW index, whatever
  the memory layout): ``m = µ_c + r_mu·(2u₁ − 1)``, ``s = σ_c + r_sigma·√(−2 ln u₂)·cos(2π u₃)`` (Box–Muller).

So the backward regenerates s from the seed instead of keeping a tensor of it (noisy-bn then holds the memory of
bn), and a data-parallel replica draws only its own rows: its counters start at its first row of the global batch.

``element_noise`` is called by the fused batch-norm kernels (:mod:`~normzoo.kernels.stats`,
:mod:`~normzoo.kernels.grad`); ``channel_noise_kernel`` is the noise alone (``noisy-bn:bn=false``), forward
``s·a + m`` and backward ``s·g``, and can also return the draws themselves (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from normzoo.kernels.common import tile_offsets
from normzoo.kernels.tiling import LAUNCH, strides, tiling

@triton.jit
def channel_draws(seed, cols, mu, sigma):
    """µ_j ~ U(−mu, mu) and σ_j ~ U(1, sigma) of the channels ``cols``."""
    u1, u2, _, _ = tl.rand4x(seed, -1 - cols.to(tl.int64))
    return mu * (2.0 * u1 - 1.0), 1.0 + (sigma - 1.0) * u2


@triton.jit
def element_noise(seed_ptr, rows, cols, C, HW, mu, sigma, r_mu, r_sigma):
    """(m, s) of the tile ``rows`` × ``cols``; ``rows`` are rows of the global batch (sample·HW + position)."""
    seed = tl.load(seed_ptr)
    n = rows // HW
    counter = (n.to(tl.int64)[:, None] * C + cols.to(tl.int64)[None, :]) * HW + (rows - n * HW)[:, None]
    u1, u2, u3, _ = tl.rand4x(seed, counter)
    normal, _ = tl.random.pair_uniform_to_normal(u2, u3)
    mu_c, sigma_c = channel_draws(seed, cols, mu, sigma)
    return mu_c[None, :] + r_mu * (2.0 * u1 - 1.0), sigma_c[None, :] + r_sigma * normal


@triton.jit
def channel_noise_kernel(a_ptr, out_ptr, m_ptr, s_ptr, seed_ptr, R, C, HW, sa_n, sa_c, sa_hw, so_n, so_c, so_hw,
                         rows_per_split, row0, mu, sigma, r_mu, r_sigma, BACKWARD: tl.constexpr,
                         DRAWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    start = tl.program_id(1) * rows_per_split
    end = tl.minimum(start + rows_per_split, R)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & cmask[None, :]
        a = tl.load(a_ptr + tile_offsets(rows, cols, HW, sa_n, sa_c, sa_hw), mask=mask, other=0.0).to(tl.float32)
        m, s = element_noise(seed_ptr, rows + row0 * HW, cols, C, HW, mu, sigma, r_mu, r_sigma)
        out_at = tile_offsets(rows, cols, HW, so_n, so_c, so_hw)
        if BACKWARD:
            tl.store(out_ptr + out_at, (s * a).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + out_at, (s * a + m).to(out_ptr.dtype.element_ty), mask=mask)
        if DRAWS:
            tl.store(m_ptr + out_at, m, mask=mask)
            tl.store(s_ptr + out_at, s, mask=mask)


def channel_noise(a: torch.Tensor, seed: torch.Tensor, row0: int, mu: float, sigma: float, r_mu: float,
                  r_sigma: float, *, backward: bool = False, draws: bool = False):
    """``s·a + m`` (``backward``: ``s·a``) for a 2-D or mergeable 4-D ``a``; with ``draws`` also (m, s) in float32."""
    t = tiling(a)
    out = torch.empty_like(a)
    m = s = out
    if draws:  # written with the output's strides: empty_like keeps the layout
        m = torch.empty_like(a, dtype=torch.float32)
        s = torch.empty_like(m)
    channel_noise_kernel[t.grid](a, out, m, s, seed, t.rows, t.channels, t.hw, *strides(a), *strides(out),
                                 t.rows_per_split, row0, mu, sigma, r_mu, r_sigma, BACKWARD=backward, DRAWS=draws,
                                 BLOCK_R=t.block_r, BLOCK_C=t.block_c, num_warps=t.num_warps, **LAUNCH)
    return (out, m, s) if draws else out
