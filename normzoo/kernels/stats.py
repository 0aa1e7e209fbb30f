"""Forward kernels of the batch norms: per-channel statistics in one read, their combination, and normalize+affine.

``channel_stats_kernel`` reads its tiles once and writes, per (split, channel), the partial results a scale needs
(rows of :mod:`~normzoo.kernels.tiling`'s ``PARTS``): the count, then by ``MODE``

* ``SQ``: Σx, Σx² (uncentered p = 2);
* ``VAR``: the split's mean and M2 = Σ(x − mean_split)², computed about the split's first value so that a mean far
  from zero costs no precision (centered p = 2 and batch norm; combined across splits by Chan's formula);
* ``ABS`` / ``POW``: Σx, Σ|z| or Σ|z|^p, with z = x, or z = x − µ when ``CENTERED`` (a second pass, given µ);
* ``MAX``: Σx, max x, min x (max |x − µ| = max(max x − µ, µ − min x) needs no second pass); with ``TABLE`` also
  the maximum and minimum of every group of ``GROUP`` rows, which the top-k selection searches.

``finalize_kernel`` combines the partials of every split (and, for synced statistics, of every replica) into the
per-channel mean, scale and the affine ``out = x·A + B`` that ``normalize_kernel`` applies, noise included for
noisy-bn. Statistics are float32 whatever the input dtype; the output is written in the input's dtype and layout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from normzoo.kernels import tiling
from normzoo.kernels.common import power, tile_offsets
from normzoo.kernels.noise import element_noise

# Scale statistics (the MODE constexpr).
SQ = tl.constexpr(0)
VAR = tl.constexpr(1)
ABS = tl.constexpr(2)
POW = tl.constexpr(3)
MAX = tl.constexpr(4)
# Where noisy-bn's noise goes (the NOISE constexpr).
NO_NOISE = tl.constexpr(0)
AFTER = tl.constexpr(1)  # s·(γ x̂ + β) + m
BEFORE = tl.constexpr(2)  # γ (s·x̂ + m) + β
COEF_A = tl.constexpr(tiling.COEF_A)
COEF_MEAN = tl.constexpr(tiling.COEF_MEAN)
COEF_INV = tl.constexpr(tiling.COEF_INV)
COEF_GAMMA = tl.constexpr(tiling.COEF_GAMMA)
COEF_BETA = tl.constexpr(tiling.COEF_BETA)
AUX_T = tl.constexpr(tiling.AUX_T)
AUX_W = tl.constexpr(tiling.AUX_W)
AUX_SIGN = tl.constexpr(tiling.AUX_SIGN)
AUX_N = tl.constexpr(tiling.AUX_N)


@triton.jit
def channel_stats_kernel(x_ptr, part_ptr, center_ptr, table_ptr, R, C, HW, s_n, s_c, s_hw, rows_per_split, p,
                         n_groups, MODE: tl.constexpr, CENTERED: tl.constexpr, TABLE: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    start = tl.program_id(1) * rows_per_split
    end = tl.minimum(start + rows_per_split, R)
    if CENTERED:  # the second pass of a centered scale: z = x − µ
        shift = tl.load(center_ptr + cols, mask=cmask, other=0.0)
    elif MODE == VAR:  # sums about the split's first value (any value of the channel bounds the cancellation)
        first = (start // HW) * s_n + (start % HW) * s_hw
        shift = tl.load(x_ptr + first + cols * s_c, mask=cmask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros([BLOCK_C], tl.float32)
    acc1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    hi = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
    lo = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + tile_offsets(rows, cols, HW, s_n, s_c, s_hw), mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, x - shift[None, :], 0.0)
        acc1 += z
        if MODE == SQ or MODE == VAR:
            acc2 += z * z
        elif MODE == ABS:
            acc2 += tl.abs(z)
        elif MODE == POW:
            acc2 += power(tl.abs(z), p)
        else:  # MAX
            x_hi = tl.where(mask, x, float("-inf"))
            x_lo = tl.where(mask, x, float("inf"))
            hi = tl.maximum(hi, x_hi)
            lo = tl.minimum(lo, x_lo)
            if TABLE:
                group_hi = tl.max(tl.reshape(x_hi, (BLOCK_R // GROUP, GROUP, BLOCK_C)), axis=1)
                group_lo = tl.min(tl.reshape(x_lo, (BLOCK_R // GROUP, GROUP, BLOCK_C)), axis=1)
                groups = r0 // GROUP + tl.arange(0, BLOCK_R // GROUP)
                at = cols[None, :] * n_groups + groups[:, None]
                gmask = (groups < n_groups)[:, None] & cmask[None, :]
                tl.store(table_ptr + at, group_hi, mask=gmask)
                tl.store(table_ptr + C * n_groups + at, group_lo, mask=gmask)
    count = (end - start).to(tl.float32)
    sum1 = tl.sum(acc1, axis=0)
    out = part_ptr + tl.program_id(1) * 4 * C + cols
    tl.store(out, tl.zeros([BLOCK_C], tl.float32) + count, mask=cmask)
    if MODE == VAR:
        tl.store(out + C, shift + sum1 / count, mask=cmask)
        tl.store(out + 2 * C, tl.sum(acc2, axis=0) - sum1 * sum1 / count, mask=cmask)
    else:
        tl.store(out + C, sum1, mask=cmask)
        if MODE == MAX:
            tl.store(out + 2 * C, tl.max(hi, axis=0), mask=cmask)
            tl.store(out + 3 * C, tl.min(lo, axis=0), mask=cmask)
        else:
            tl.store(out + 2 * C, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def reduce_partials(part_ptr, S, C, cols, cmask, MODE: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Combine S partial rows per channel: (count, mean or Σx, M2 or second sum or max, min)."""
    n = tl.zeros([BLOCK_C], tl.float32)
    first = tl.zeros([BLOCK_C], tl.float32)
    second = tl.zeros([BLOCK_C], tl.float32)
    hi = tl.full([BLOCK_C], float("-inf"), tl.float32)
    lo = tl.full([BLOCK_C], float("inf"), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        mask = (splits < S)[:, None] & cmask[None, :]
        at = part_ptr + (splits * 4 * C)[:, None] + cols[None, :]
        count = tl.load(at, mask=mask, other=0.0)
        value = tl.load(at + C, mask=mask, other=0.0)
        n += tl.sum(count, axis=0)
        if MODE == VAR:
            first += tl.sum(count * value, axis=0)  # Σ n_s·mean_s
        else:
            first += tl.sum(value, axis=0)
        if MODE == MAX:
            hi = tl.maximum(hi, tl.max(tl.load(at + 2 * C, mask=mask, other=float("-inf")), axis=0))
            lo = tl.minimum(lo, tl.min(tl.load(at + 3 * C, mask=mask, other=float("inf")), axis=0))
        elif MODE != VAR:
            second += tl.sum(tl.load(at + 2 * C, mask=mask, other=0.0), axis=0)
    if MODE == VAR:  # Chan et al.: M2 = Σ M2_s + n_s (mean_s − mean)²
        first = first / tl.maximum(n, 1.0)
        for s0 in range(0, S, BLOCK_S):
            splits = s0 + tl.arange(0, BLOCK_S)
            mask = (splits < S)[:, None] & cmask[None, :]
            at = part_ptr + (splits * 4 * C)[:, None] + cols[None, :]
            count = tl.load(at, mask=mask, other=0.0)
            delta = tl.load(at + C, mask=mask, other=0.0) - first[None, :]
            second += tl.sum(tl.load(at + 2 * C, mask=mask, other=0.0) + count * delta * delta, axis=0)
    if MODE == MAX:
        second = hi
    return n, first, second, lo


@triton.jit
def combine_partials_kernel(part_ptr, out_ptr, S, C, MODE: tl.constexpr, BLOCK_S: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """One partial row from S (a replica's share of synced statistics, in the partial format)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n, first, second, third = reduce_partials(part_ptr, S, C, cols, cmask, MODE, BLOCK_S, BLOCK_C)
    tl.store(out_ptr + cols, n, mask=cmask)
    tl.store(out_ptr + C + cols, first, mask=cmask)
    tl.store(out_ptr + 2 * C + cols, second, mask=cmask)
    tl.store(out_ptr + 3 * C + cols, third, mask=cmask)


@triton.jit
def store_coefficients(coef_ptr, weight_ptr, bias_ptr, cols, cmask, C, mean, inv,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out = (x − µ)·A + β with A = γ/d; x̂ = (x − µ)·inv; γ and β (1 and 0 without affine)."""
    gamma = inv * 0 + 1.0
    beta = inv * 0
    if HAS_WEIGHT:
        gamma = tl.load(weight_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(coef_ptr + COEF_A * C + cols, gamma * inv, mask=cmask)
    tl.store(coef_ptr + COEF_MEAN * C + cols, mean, mask=cmask)
    tl.store(coef_ptr + COEF_INV * C + cols, inv, mask=cmask)
    tl.store(coef_ptr + COEF_GAMMA * C + cols, gamma, mask=cmask)
    tl.store(coef_ptr + COEF_BETA * C + cols, beta, mask=cmask)


@triton.jit
def finalize_kernel(part_ptr, dev_ptr, weight_ptr, bias_ptr, mean_ptr, scale_ptr, aux_ptr, coef_ptr, S, C, p, factor,
                    eps,
                    MODE: tl.constexpr, CENTERED: tl.constexpr, BN: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mean and scale per channel from the partials; the affine coefficients of the normalize pass.

    ``CENTERED`` with ``ABS``/``POW``: the scale comes from the second pass's partials (``dev_ptr``). ``BN``: the
    scale is the biased variance and d = sqrt(var + eps) (batch norm), else d = scale + eps.
    """
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n, first, second, third = reduce_partials(part_ptr, S, C, cols, cmask, MODE, BLOCK_S, BLOCK_C)
    if MODE == VAR:
        mean = first
    else:
        mean = first / n
    if CENTERED and (MODE == ABS or MODE == POW):
        _, _, second, _ = reduce_partials(dev_ptr, S, C, cols, cmask, MODE, BLOCK_S, BLOCK_C)
    if MODE == VAR:
        var = tl.maximum(second / n, 0.0)
        scale = var if BN else tl.sqrt(var) * factor
    elif MODE == SQ:
        scale = tl.sqrt(tl.maximum(second / n, 0.0)) * factor
    elif MODE == ABS:
        scale = second / n * factor
    elif MODE == POW:
        scale = power(second / n, 1.0 / p) * factor
    else:  # MAX: second = max x, third = min x
        if CENTERED:
            scale = tl.maximum(second - mean, mean - third) * factor
        else:
            scale = tl.maximum(second, -third) * factor
    if BN:
        inv = 1.0 / tl.sqrt(scale + eps)
    else:
        inv = 1.0 / (scale + eps)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(scale_ptr + cols, scale, mask=cmask)
    tl.store(aux_ptr + AUX_N * C + cols, n, mask=cmask)
    for row in tl.static_range(3):  # the top-k selection's rows, unused here: defined values, not garbage
        tl.store(aux_ptr + (AUX_T + row) * C + cols, n * 0, mask=cmask)
    store_coefficients(coef_ptr, weight_ptr, bias_ptr, cols, cmask, C, mean, inv, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def normalize_kernel(x_ptr, out_ptr, coef_ptr, seed_ptr, R, C, HW, sx_n, sx_c, sx_hw, so_n, so_c, so_hw,
                     rows_per_split, row0, mu, sigma, r_mu, r_sigma, NOISE: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """out = (x − µ)·A + β per channel (noisy-bn: with Algorithm 1's noise drawn here, see ``noise.element_noise``)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(coef_ptr + COEF_MEAN * C + cols, mask=cmask, other=0.0)[None, :]
    beta = tl.load(coef_ptr + COEF_BETA * C + cols, mask=cmask, other=0.0)[None, :]
    if NOISE == BEFORE:  # x̂ first; γ, β after the noise
        a = tl.load(coef_ptr + COEF_INV * C + cols, mask=cmask, other=0.0)[None, :]
        gamma = tl.load(coef_ptr + COEF_GAMMA * C + cols, mask=cmask, other=0.0)[None, :]
        b = beta * 0
    else:
        a = tl.load(coef_ptr + COEF_A * C + cols, mask=cmask, other=0.0)[None, :]
        b = beta
    start = tl.program_id(1) * rows_per_split
    end = tl.minimum(start + rows_per_split, R)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + tile_offsets(rows, cols, HW, sx_n, sx_c, sx_hw), mask=mask, other=0.0)
        y = (x.to(tl.float32) - mean) * a + b
        if NOISE != NO_NOISE:
            m, s = element_noise(seed_ptr, rows + row0 * HW, cols, C, HW, mu, sigma, r_mu, r_sigma)
            if NOISE == AFTER:
                y = s * y + m
            else:
                y = gamma * (s * y + m) + beta
        tl.store(out_ptr + tile_offsets(rows, cols, HW, so_n, so_c, so_hw), y.to(out_ptr.dtype.element_ty),
                 mask=mask)
