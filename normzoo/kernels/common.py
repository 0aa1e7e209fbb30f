"""Triton helpers shared by the kernels: tile addresses and a few elementwise functions."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_offsets(rows, cols, HW, s_n, s_c, s_hw):
    """Element offsets of the tile ``rows`` × ``cols`` (row r = sample r // HW, position r % HW)."""
    n = rows // HW
    return (n * s_n + (rows - n * HW) * s_hw)[:, None] + (cols * s_c)[None, :]


@triton.jit
def power(a, p):
    """a^p for a ≥ 0 and p > 0 (0 at a = 0, without evaluating log 0)."""
    return tl.where(a > 0, tl.exp2(p * tl.log2(tl.maximum(a, 1e-38))), 0.0)


@triton.jit
def signum(z):
    return tl.where(z > 0, 1.0, tl.where(z < 0, -1.0, 0.0))
