"""Exact per-channel top-k of |x − µ| without sorting a channel: group maxima, then a threshold search.

The statistics pass (``channel_stats_kernel`` with ``TABLE``) records the maximum and minimum of every group of
``GROUP`` consecutive rows, so each group's largest |x − µ| is ``max(max − µ, µ − min)`` once µ is known.
``topk_select_kernel`` (one program per channel) then

1. finds T, the k-th largest group key, by a bitwise search over float bit patterns (for non-negative floats the
   bits order like the values): 31 rounds of counting the keys ≥ a candidate. The k groups with keys ≥ T hold k
   values ≥ T, so the k-th largest value v is ≥ T, and every value ≥ T lies in a group whose key is ≥ T;
2. compacts the indices of those candidate groups (about k of them; more only on tied keys);
3. finds v by the same bitwise search, counting only over the candidates (any candidate bit pattern ≤ T is
   accepted without counting: at least k values are ≥ T);
4. sums over the candidates what the scale and the backward need: Σ|z| and the count over |z| > v, the count at
   |z| = v, and the signs.

The scale is ``(Σ_{|z|>v} |z| + (k − #{|z|>v})·v)/k``: exactly the mean of the k largest, ties included.
With k above the number of groups, T is 0 and every group is a candidate. The group size balances the two
searches (about sqrt(R/k) rows: R/group keys against k·group candidates).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from normzoo.kernels.common import signum
from normzoo.kernels.grad import AUX_N, AUX_SIGN, AUX_T, AUX_W
from normzoo.kernels.stats import store_coefficients


def group_size(rows: int, k: int, block_r: int) -> int:
    """Rows per group: the power of two nearest sqrt(rows / k), at most a tile's rows."""
    target = math.sqrt(rows / max(k, 1))
    return max(1, min(block_r, 1 << max(0, round(math.log2(max(target, 1.0))))))


@triton.jit
def group_key_bits(table_ptr, c, g, n_groups, C, mean):
    """Bit patterns of the groups' largest |x − µ| (−1 past the last group)."""
    valid = g < n_groups
    hi = tl.load(table_ptr + c * n_groups + g, mask=valid, other=0.0)
    lo = tl.load(table_ptr + (C + c) * n_groups + g, mask=valid, other=0.0)
    key = tl.maximum(hi - mean, mean - lo)
    return tl.where(valid, key.to(tl.int32, bitcast=True), -1)


@triton.jit
def candidate_bits(x_ptr, list_ptr, c, i0, count, n_groups, R, HW, s_n, s_c, s_hw, mean, BLOCK_L: tl.constexpr,
                   GROUP: tl.constexpr):
    """|x − µ| of the candidate groups i0 .. i0 + BLOCK_L of channel c: (value, its bits, z, valid mask)."""
    i = i0 + tl.arange(0, BLOCK_L)
    groups = tl.load(list_ptr + c * n_groups + i, mask=i < count, other=0)
    rows = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = (i < count)[:, None] & (rows < R)
    n = rows // HW
    x = tl.load(x_ptr + n * s_n + (rows - n * HW) * s_hw + c * s_c, mask=mask, other=0.0).to(tl.float32)
    z = x - mean
    a = tl.abs(z)
    return a, tl.where(mask, a.to(tl.int32, bitcast=True), -1), z, mask


@triton.jit
def topk_select_kernel(x_ptr, part_ptr, table_ptr, list_ptr, weight_ptr, bias_ptr, mean_ptr, scale_ptr, aux_ptr,
                       coef_ptr, R, C, HW, s_n, s_c, s_hw, S, n_groups, k, eps, HAS_WEIGHT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_L: tl.constexpr, GROUP: tl.constexpr):
    c = tl.program_id(0)
    total = tl.zeros([BLOCK_S], tl.float32)
    n = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        n += tl.load(part_ptr + splits * 4 * C + c, mask=splits < S, other=0.0)
        total += tl.load(part_ptr + (splits * 4 + 1) * C + c, mask=splits < S, other=0.0)
    mean = tl.sum(total, axis=0) / tl.sum(n, axis=0)

    # 1. T: the largest bit pattern with at least k group keys at or above it.
    t_bits = tl.zeros([], tl.int32)
    for bit in range(30, -1, -1):
        candidate = t_bits | (1 << bit)
        above = tl.zeros([], tl.int32)
        for g0 in range(0, n_groups, BLOCK_G):
            keys = group_key_bits(table_ptr, c, g0 + tl.arange(0, BLOCK_G), n_groups, C, mean)
            above += tl.sum((keys >= candidate).to(tl.int32), axis=0)
        t_bits = tl.where(above >= k, candidate, t_bits)

    # 2. The candidate groups, compacted.
    count = tl.zeros([], tl.int32)
    for g0 in range(0, n_groups, BLOCK_G):
        groups = g0 + tl.arange(0, BLOCK_G)
        chosen = group_key_bits(table_ptr, c, groups, n_groups, C, mean) >= t_bits
        position = count + tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(list_ptr + c * n_groups + position, groups, mask=chosen)
        count += tl.sum(chosen.to(tl.int32), axis=0)

    # 3. v: the k-th largest |x − µ|, counting over the candidates only above T.
    v_bits = tl.zeros([], tl.int32)
    for bit in range(30, -1, -1):
        candidate = v_bits | (1 << bit)
        above = tl.zeros([], tl.int32) + k
        if candidate > t_bits:
            above = tl.zeros([], tl.int32)
            for i0 in range(0, count, BLOCK_L):
                _, bits, _, _ = candidate_bits(x_ptr, list_ptr, c, i0, count, n_groups, R, HW, s_n, s_c, s_hw,
                                               mean, BLOCK_L, GROUP)
                above += tl.sum((bits >= candidate).to(tl.int32))
        v_bits = tl.where(above >= k, candidate, v_bits)
    v = v_bits.to(tl.float32, bitcast=True)

    # 4. What the scale and the backward need.
    sum_above = tl.zeros([], tl.float32)
    n_above = tl.zeros([], tl.float32)
    n_tied = tl.zeros([], tl.float32)
    sign_above = tl.zeros([], tl.float32)
    sign_tied = tl.zeros([], tl.float32)
    for i0 in range(0, count, BLOCK_L):
        a, bits, z, mask = candidate_bits(x_ptr, list_ptr, c, i0, count, n_groups, R, HW, s_n, s_c, s_hw, mean,
                                          BLOCK_L, GROUP)
        is_above = mask & (bits > v_bits)
        is_tied = mask & (bits == v_bits)
        sum_above += tl.sum(tl.where(is_above, a, 0.0))
        n_above += tl.sum(tl.where(is_above, 1.0, 0.0))
        n_tied += tl.sum(tl.where(is_tied, 1.0, 0.0))
        sign_above += tl.sum(tl.where(is_above, signum(z), 0.0))
        sign_tied += tl.sum(tl.where(is_tied, signum(z), 0.0))
    kf = k * 1.0
    scale = (sum_above + (kf - n_above) * v) / kf
    tie_weight = (kf - n_above) / tl.maximum(n_tied, 1.0)
    tl.store(mean_ptr + c, mean)
    tl.store(scale_ptr + c, scale)
    tl.store(aux_ptr + AUX_T * C + c, v)
    tl.store(aux_ptr + AUX_W * C + c, tie_weight)
    tl.store(aux_ptr + AUX_SIGN * C + c, sign_above + tie_weight * sign_tied)
    tl.store(aux_ptr + AUX_N * C + c, tl.sum(n, axis=0))
    cols = c + tl.arange(0, 1)
    store_coefficients(coef_ptr, weight_ptr, bias_ptr, cols, cols < C, C, mean + tl.zeros([1], tl.float32),
                       1.0 / (scale + eps) + tl.zeros([1], tl.float32), HAS_WEIGHT, HAS_BIAS)
