"""Backward kernels of the batch norms: one reduction pass, a per-channel finalize, one elementwise pass.

With g = dL/dout, n values per channel, d the divisor (s + eps; sqrt(var + eps) for batch norm), x̂ = (x − µ)/d and
G = Σ γ g x̂ (γ·dL/dγ), every variant's input gradient is (see :mod:`normzoo.norms._scale`)

    dL/dx_j = (γ/d)(g_j − mean g) − (G/d)·ds/dx_j,     ds/dx_j = Q1·(φ(z_j) − mean φ(z))   (centered; else no mean)

with z = x − µ (centered) or x, and by the scale (the ``PHI`` constexpr):

* ``LINEAR`` (p = 2, batch norm): φ(z) = z, Q1 = factor²/(n s) (batch norm: 1/(n d)); mean φ = 0;
* ``SIGN`` (p = 1, l1-bn): φ(z) = sign z, Q1 = factor/n;
* ``POWER`` (any other p): φ(z) = sign(z)|z|^(p−1), Q1 = factor^p s^(1−p)/n;
* ``SELECT`` (ℓ∞, top-k): φ(z) = sign(z)·([|z| > t] + w·[|z| = t]), Q1 = factor/k, with t the k-th largest |z|
  and w = (k − #{|z| > t})/#{|z| = t}: ties at the threshold share the remaining weight equally (the subgradient
  ``torch.amax`` takes; without ties it is the gradient at the k selected elements).

``grad_stats_kernel`` reads g and x once for Σg, Σg(x − µ) and the sums the centering needs (Σφ; for ℓ∞ the
count of maximizers); ``grad_finalize_kernel`` turns them into per-channel coefficients with dL/dγ, dL/dβ;
``grad_input_kernel`` writes ``dx = g·A + E + F·φ(z)``. For noisy-bn the noise scale s is regenerated from the
seed in both passes (g becomes g·s), never stored.
"""

from __future__ import annotations

import triton
import triton.language as tl

from normzoo.kernels import tiling
from normzoo.kernels.common import power, signum, tile_offsets
from normzoo.kernels.noise import element_noise
from normzoo.kernels.stats import AUX_N, AUX_SIGN, AUX_T, AUX_W, BEFORE, NO_NOISE

LINEAR = tl.constexpr(0)
SIGN = tl.constexpr(1)
POWER = tl.constexpr(2)
SELECT = tl.constexpr(3)
DCOEF_A = tl.constexpr(tiling.DCOEF_A)
DCOEF_E = tl.constexpr(tiling.DCOEF_E)
DCOEF_F = tl.constexpr(tiling.DCOEF_F)
DCOEF_T = tl.constexpr(tiling.DCOEF_T)
DCOEF_W = tl.constexpr(tiling.DCOEF_W)


@triton.jit
def phi(z, t, w, p, PHI: tl.constexpr):
    """φ(z) of the scale (see the module docstring); t, w broadcast per channel."""
    if PHI == LINEAR:
        return z
    elif PHI == SIGN:
        return signum(z)
    elif PHI == POWER:
        return signum(z) * power(tl.abs(z), p - 1.0)
    else:
        a = tl.abs(z)
        return signum(z) * tl.where(a > t, 1.0, tl.where(a == t, w, 0.0))


@triton.jit
def grad_stats_kernel(g_ptr, x_ptr, part_ptr, mean_ptr, scale_ptr, seed_ptr, R, C, HW, sg_n, sg_c, sg_hw, sx_n,
                      sx_c, sx_hw, rows_per_split, p, row0, mu, sigma, r_mu, r_sigma, PHI: tl.constexpr,
                      CENTERED: tl.constexpr, MAX_TIES: tl.constexpr, NOISE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partials per (split, channel): Σg', Σg'(x − µ), then Σφ (centered SIGN/POWER), or the number of maximizers
    and their Σ sign z (``MAX_TIES``, ℓ∞), or Σg·m and Σg (noise ``BEFORE``); g' = g·s with noise, else g."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
    top = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]  # ℓ∞: the maximum |z|
    start = tl.program_id(1) * rows_per_split
    end = tl.minimum(start + rows_per_split, R)
    sum_g = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sum_gz = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    aux1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    aux2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & cmask[None, :]
        g = tl.load(g_ptr + tile_offsets(rows, cols, HW, sg_n, sg_c, sg_hw), mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + tile_offsets(rows, cols, HW, sx_n, sx_c, sx_hw), mask=mask, other=0.0).to(tl.float32)
        if NOISE != NO_NOISE:
            m, s = element_noise(seed_ptr, rows + row0 * HW, cols, C, HW, mu, sigma, r_mu, r_sigma)
            if NOISE == BEFORE:
                aux1 += g * m
                aux2 += g
            g = g * s
        centered = tl.where(mask, x - mean, 0.0)
        sum_g += g
        sum_gz += g * centered
        if CENTERED:
            z = centered
        else:
            z = x
        if MAX_TIES:
            tie = mask & (tl.abs(z) == top)
            aux1 += tl.where(tie, 1.0, 0.0)
            aux2 += tl.where(tie, signum(z), 0.0)
        elif CENTERED and (PHI == SIGN or PHI == POWER):
            aux1 += tl.where(mask, phi(z, top, top, p, PHI), 0.0)
    out = part_ptr + tl.program_id(1) * 4 * C + cols
    tl.store(out, tl.sum(sum_g, axis=0), mask=cmask)
    tl.store(out + C, tl.sum(sum_gz, axis=0), mask=cmask)
    tl.store(out + 2 * C, tl.sum(aux1, axis=0), mask=cmask)
    tl.store(out + 3 * C, tl.sum(aux2, axis=0), mask=cmask)


@triton.jit
def sum_partials(part_ptr, S, C, cols, cmask, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The four partial sums per channel over S rows, in a fixed order."""
    sum0 = tl.zeros([BLOCK_C], tl.float32)
    sum1 = tl.zeros([BLOCK_C], tl.float32)
    sum2 = tl.zeros([BLOCK_C], tl.float32)
    sum3 = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        at = part_ptr + (splits * 4 * C)[:, None] + cols[None, :]
        mask = (splits < S)[:, None] & cmask[None, :]
        sum0 += tl.sum(tl.load(at, mask=mask, other=0.0), axis=0)
        sum1 += tl.sum(tl.load(at + C, mask=mask, other=0.0), axis=0)
        sum2 += tl.sum(tl.load(at + 2 * C, mask=mask, other=0.0), axis=0)
        sum3 += tl.sum(tl.load(at + 3 * C, mask=mask, other=0.0), axis=0)
    return sum0, sum1, sum2, sum3


@triton.jit
def grad_finalize_kernel(part_ptr, local_ptr, mean_ptr, scale_ptr, aux_ptr, weight_ptr, dcoef_ptr, dw_ptr, db_ptr, S,
                         S_local, C, p, factor, eps, k, PHI: tl.constexpr, CENTERED: tl.constexpr,
                         MAX_TIES: tl.constexpr, BN: tl.constexpr, NOISE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         SYNCED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel coefficients of the elementwise pass from every split's (and replica's) sums; dL/dγ and dL/dβ
    from this replica's own sums (``local_ptr``): with synced statistics each replica's parameter gradient is its
    own share, which data-parallel training then reduces, as with torch's SyncBatchNorm."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sum_g, sum_gz, aux1, aux2 = sum_partials(part_ptr, S, C, cols, cmask, BLOCK_S, BLOCK_C)
    if SYNCED:
        local_g, local_gz, local1, local2 = sum_partials(local_ptr, S_local, C, cols, cmask, BLOCK_S, BLOCK_C)
    else:
        local_g, local_gz, local1, local2 = sum_g, sum_gz, aux1, aux2
    scale = tl.load(scale_ptr + cols, mask=cmask, other=1.0)
    n = tl.load(aux_ptr + AUX_N * C + cols, mask=cmask, other=1.0)
    if BN:
        d = tl.sqrt(scale + eps)
    else:
        d = scale + eps
    inv = 1.0 / d
    gamma = inv * 0 + 1.0
    if HAS_WEIGHT:
        gamma = tl.load(weight_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    sum_gy = sum_gz * inv  # Σ g'·x̂
    a = gamma * inv
    k_coef = -gamma * sum_gy * inv  # −G/d
    t = scale
    w = inv * 0
    mean_phi = inv * 0
    positive = scale > 0
    if PHI == LINEAR:
        if BN:
            q1 = inv / n
        else:
            q1 = tl.where(positive, factor * factor / (n * tl.where(positive, scale, 1.0)), 0.0)
    elif PHI == SIGN:
        q1 = inv * 0 + factor / n
        mean_phi = aux1 / n
    elif PHI == POWER:
        q1 = tl.where(positive, power(factor, p) * power(tl.where(positive, scale, 1.0), 1.0 - p) / n, 0.0)
        mean_phi = aux1 / n
    else:
        if MAX_TIES:  # ℓ∞: the maximizers share the weight
            w = 1.0 / tl.maximum(aux1, 1.0)
            mean_phi = aux2 * w / n
            q1 = inv * 0 + factor
        else:  # top-k: threshold and tie weight from the forward's selection
            t = tl.load(aux_ptr + AUX_T * C + cols, mask=cmask, other=0.0)
            w = tl.load(aux_ptr + AUX_W * C + cols, mask=cmask, other=0.0)
            mean_phi = tl.load(aux_ptr + AUX_SIGN * C + cols, mask=cmask, other=0.0) / n
            q1 = inv * 0 + factor / k
    if not CENTERED:
        mean_phi = mean_phi * 0
    tl.store(dcoef_ptr + DCOEF_A * C + cols, a, mask=cmask)
    tl.store(dcoef_ptr + DCOEF_E * C + cols, -a * sum_g / n - k_coef * q1 * mean_phi, mask=cmask)
    tl.store(dcoef_ptr + DCOEF_F * C + cols, k_coef * q1, mask=cmask)
    tl.store(dcoef_ptr + DCOEF_T * C + cols, t, mask=cmask)
    tl.store(dcoef_ptr + DCOEF_W * C + cols, w, mask=cmask)
    if NOISE == BEFORE:  # out = γ(s·x̂ + m) + β: dγ = Σ g(s x̂ + m), dβ = Σ g
        tl.store(dw_ptr + cols, local_gz * inv + local1, mask=cmask)
        tl.store(db_ptr + cols, local2, mask=cmask)
    else:
        tl.store(dw_ptr + cols, local_gz * inv, mask=cmask)
        tl.store(db_ptr + cols, local_g, mask=cmask)


@triton.jit
def grad_input_kernel(g_ptr, x_ptr, dx_ptr, mean_ptr, dcoef_ptr, seed_ptr, R, C, HW, sg_n, sg_c, sg_hw, sx_n, sx_c,
                      sx_hw, sd_n, sd_c, sd_hw, rows_per_split, p, row0, mu, sigma, r_mu, r_sigma,
                      PHI: tl.constexpr, CENTERED: tl.constexpr, NOISE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    a = tl.load(dcoef_ptr + DCOEF_A * C + cols, mask=cmask, other=0.0)[None, :]
    e = tl.load(dcoef_ptr + DCOEF_E * C + cols, mask=cmask, other=0.0)[None, :]
    f = tl.load(dcoef_ptr + DCOEF_F * C + cols, mask=cmask, other=0.0)[None, :]
    t = tl.load(dcoef_ptr + DCOEF_T * C + cols, mask=cmask, other=0.0)[None, :]
    w = tl.load(dcoef_ptr + DCOEF_W * C + cols, mask=cmask, other=0.0)[None, :]
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
    start = tl.program_id(1) * rows_per_split
    end = tl.minimum(start + rows_per_split, R)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & cmask[None, :]
        g = tl.load(g_ptr + tile_offsets(rows, cols, HW, sg_n, sg_c, sg_hw), mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + tile_offsets(rows, cols, HW, sx_n, sx_c, sx_hw), mask=mask, other=0.0).to(tl.float32)
        if NOISE != NO_NOISE:
            _, s = element_noise(seed_ptr, rows + row0 * HW, cols, C, HW, mu, sigma, r_mu, r_sigma)
            g = g * s
        if CENTERED:
            z = x - mean
        else:
            z = x
        dx = g * a + e + f * phi(z, t, w, p, PHI)
        tl.store(dx_ptr + tile_offsets(rows, cols, HW, sd_n, sd_c, sd_hw), dx.to(dx_ptr.dtype.element_ty), mask=mask)
