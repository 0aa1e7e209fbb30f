"""Launch sequences of the batch-norm kernels: which passes run, in which order, on which buffers.

Forward (train mode), by scale:

* one-pass scales (uncentered ℓp, centered ℓ2, ℓ∞, batch norm): statistics → finalize → normalize;
* centered ℓ1 and ℓp (l1-bn among them): statistics (the mean) → finalize → deviation statistics → finalize →
  normalize (mean |x − µ|^p needs µ first);
* top-k: statistics with group extrema → selection (one program per channel) → normalize.

Backward: reduction → finalize → elementwise. Every buffer between passes is a few floats per channel.

Synced statistics (``gather``): each statistics pass's partials are first combined into one row per replica, then
``gather`` concatenates every replica's row (an all-gather) and the finalize kernel combines those as it combines
splits, so all replicas normalize with the statistics of the whole batch; the backward gathers its sums the same way.

The launchers take tensors on any device: CPU tensors run through Triton's interpreter (tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from normzoo.kernels.grad import LINEAR, POWER, SELECT, SIGN, grad_finalize_kernel, grad_input_kernel, \
    grad_stats_kernel
from normzoo.kernels.stats import ABS, AFTER, BEFORE, MAX, NO_NOISE, POW, SQ, VAR, channel_stats_kernel, \
    combine_partials_kernel, finalize_kernel, normalize_kernel
from normzoo.kernels.tiling import AUX_ROWS, COEFS, DCOEFS, LAUNCH, PARTS, Tiling, strides, tiling
from normzoo.kernels.topk import group_size, topk_select_kernel

Gather = Callable[[Tensor], Tensor]
TOPK = -1  # the stats pass of top-k is MAX's with group extrema


@dataclass(frozen=True)
class Scale:
    """What a batch norm divides by, as the kernels see it (``Scale.of`` reads the custom op's arguments)."""

    mode: int  # SQ, VAR, ABS, POW, MAX or TOPK
    phi: int  # how s depends on x (grad.LINEAR, SIGN, POWER, SELECT)
    p: float
    centered: bool
    factor: float = 1.0
    k: int = 1
    bn: bool = False  # batch norm: scale = variance, d = sqrt(var + eps), running variance unbiased

    @classmethod
    def of(cls, kind: str, p: float, centered: bool, factor: float, k: int) -> Scale:
        if kind == "topk":
            return cls(TOPK, SELECT.value, math.inf, True, factor, k)
        if kind == "bn":
            return cls(VAR.value, LINEAR.value, 2.0, True, bn=True)
        if p == 2.0:
            return cls((VAR if centered else SQ).value, LINEAR.value, p, centered, factor)
        if p == 1.0:
            return cls(ABS.value, SIGN.value, p, centered, factor)
        if math.isinf(p):
            return cls(MAX.value, SELECT.value, p, centered, factor)
        return cls(POW.value, POWER.value, p, centered, factor)

    @property
    def stats_mode(self) -> int:
        return MAX.value if self.mode == TOPK else self.mode

    @property
    def two_pass(self) -> bool:
        return self.centered and self.mode in (ABS.value, POW.value)

    @property
    def pow_p(self) -> float:
        return 2.0 if math.isinf(self.p) else self.p  # a finite stand-in where the kernels never use p


@dataclass(frozen=True)
class Noise:
    """noisy-bn's noise for the fused kernels: a seed tensor, this replica's first row, Algorithm 1's constants."""

    seed: Tensor
    row0: int
    mu: float
    sigma: float
    r_mu: float
    r_sigma: float
    before: bool  # where=before (γ, β applied after the noise)

    @property
    def mode(self) -> int:
        return (BEFORE if self.before else AFTER).value

    def args(self) -> tuple:
        return self.seed, self.row0, self.mu, self.sigma, self.r_mu, self.r_sigma


def _noise_args(noise: Noise | None, placeholder: Tensor) -> tuple[int, tuple]:
    """The NOISE constexpr and the noise arguments of a launch (without noise: a tensor never read as the seed)."""
    if noise is None:
        return NO_NOISE.value, (placeholder, 0, 0.0, 1.0, 0.0, 0.0)
    return noise.mode, noise.args()


def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, scale: Scale, eps: float, *,
            gather: Gather | None = None, noise: Noise | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train-mode output, batch mean, batch scale (batch norm: biased variance) and the aux rows for the backward."""
    t = tiling(x)
    if scale.mode == TOPK:
        t = replace(t, group=group_size(t.rows, scale.k, t.block_r))
    C, f32 = t.channels, {"device": x.device, "dtype": torch.float32}
    mean, s = torch.empty(C, **f32), torch.empty(C, **f32)
    aux, coef = torch.empty(AUX_ROWS, C, **f32), torch.empty(COEFS, C, **f32)
    affine = (weight if weight is not None else s, bias if bias is not None else s)
    flags = {"HAS_WEIGHT": weight is not None, "HAS_BIAS": bias is not None}
    table = torch.empty(2, C, t.groups, **f32) if scale.mode == TOPK else s
    part = _statistics(x, t, scale.stats_mode, scale.pow_p, gather, table=table if scale.mode == TOPK else None)
    if scale.mode == TOPK:
        k = min(scale.k, t.rows)
        candidates = torch.empty(C, t.groups, device=x.device, dtype=torch.int32)
        topk_select_kernel[(C,)](x, part, table, candidates, *affine, mean, s, aux, coef, t.rows, C, t.hw,
                                 *strides(x), part.shape[0], t.groups, k, eps, **flags,
                                 BLOCK_S=_pow2_at_most(part.shape[0], 64), BLOCK_G=64,
                                 BLOCK_L=max(1, 1024 // t.group), GROUP=t.group, **LAUNCH)
    else:
        dev = part
        if scale.two_pass:  # µ first, then Σ|x − µ|^p
            _finalize(part, part, affine, mean, s, aux, coef, scale, eps, flags, centered=False)
            dev = _statistics(x, t, scale.mode, scale.pow_p, gather, center=mean)
        _finalize(part, dev, affine, mean, s, aux, coef, scale, eps, flags, centered=scale.centered)
    out = torch.empty_like(x)
    noise_mode, (seed, row0, *constants) = _noise_args(noise, mean)
    normalize_kernel[t.grid](x, out, coef, seed, t.rows, C, t.hw, *strides(x), *strides(out), t.rows_per_split, row0,
                             *constants, NOISE=noise_mode, BLOCK_R=t.block_r, BLOCK_C=t.block_c,
                             num_warps=t.num_warps, **LAUNCH)
    return out, mean, s, aux


def backward(grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, s: Tensor, aux: Tensor, scale: Scale,
             eps: float, *, gather: Gather | None = None, noise: Noise | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dL/dx, dL/dγ and dL/dβ (the last two per channel in float32, whether or not the norm is affine)."""
    if grad.stride() != x.stride():  # read both with one tiling
        grad = torch.empty_like(x).copy_(grad)
    t = tiling(x)
    C, f32 = t.channels, {"device": x.device, "dtype": torch.float32}
    noise_mode, (seed, row0, *constants) = _noise_args(noise, mean)
    part = torch.empty(t.splits, PARTS, C, **f32)
    modes = {"PHI": scale.phi, "CENTERED": scale.centered, "NOISE": noise_mode}
    max_ties = scale.mode == MAX.value
    grad_stats_kernel[t.grid](grad, x, part, mean, s, seed, t.rows, C, t.hw, *strides(grad), *strides(x),
                              t.rows_per_split, scale.pow_p, row0, *constants, **modes, MAX_TIES=max_ties,
                              BLOCK_R=t.block_r, BLOCK_C=t.block_c, num_warps=t.num_warps, **LAUNCH)
    local = part
    if gather is not None:
        part = gather(part.sum(0, keepdim=True))
    dcoef = torch.empty(DCOEFS, C, **f32)
    dw, db = torch.empty(C, **f32), torch.empty(C, **f32)
    block_c, block_s = _finalize_blocks(C, max(part.shape[0], local.shape[0]))
    grad_finalize_kernel[(-(-C // block_c),)](part, local, mean, s, aux, weight if weight is not None else s, dcoef,
                                              dw, db, part.shape[0], local.shape[0], C, scale.pow_p, scale.factor,
                                              eps, min(scale.k, t.rows), **modes, MAX_TIES=max_ties, BN=scale.bn,
                                              HAS_WEIGHT=weight is not None, SYNCED=gather is not None,
                                              BLOCK_S=block_s, BLOCK_C=block_c, **LAUNCH)
    dx = torch.empty_like(x)
    grad_input_kernel[t.grid](grad, x, dx, mean, dcoef, seed, t.rows, C, t.hw, *strides(grad), *strides(x),
                              *strides(dx), t.rows_per_split, scale.pow_p, row0, *constants, **modes,
                              BLOCK_R=t.block_r, BLOCK_C=t.block_c, num_warps=t.num_warps, **LAUNCH)
    return dx, dw, db


def _statistics(x: Tensor, t: Tiling, mode: int, p: float, gather: Gather | None, *, center: Tensor | None = None,
                table: Tensor | None = None) -> Tensor:
    """Partials (splits, PARTS, C) of one statistics pass; with ``gather``, every replica's combined row."""
    part = torch.empty(t.splits, PARTS, t.channels, device=x.device, dtype=torch.float32)
    channel_stats_kernel[t.grid](x, part, center if center is not None else part, table if table is not None else part,
                                 t.rows, t.channels, t.hw, *strides(x), t.rows_per_split, p, t.groups, MODE=mode,
                                 CENTERED=center is not None, TABLE=table is not None, BLOCK_R=t.block_r,
                                 BLOCK_C=t.block_c, GROUP=t.group, num_warps=t.num_warps, **LAUNCH)
    return part if gather is None else gather(_combine(part, mode))


def _combine(part: Tensor, mode: int) -> Tensor:
    C = part.shape[2]
    out = torch.empty(1, PARTS, C, device=part.device, dtype=torch.float32)
    block_c, block_s = _finalize_blocks(C, part.shape[0])
    combine_partials_kernel[(-(-C // block_c),)](part, out, part.shape[0], C, MODE=mode, BLOCK_S=block_s,
                                                 BLOCK_C=block_c, **LAUNCH)
    return out


def _finalize(part: Tensor, dev: Tensor, affine: tuple[Tensor, Tensor], mean: Tensor, s: Tensor, aux: Tensor,
              coef: Tensor, scale: Scale, eps: float, flags: dict[str, bool], *, centered: bool) -> None:
    C = part.shape[2]
    block_c, block_s = _finalize_blocks(C, part.shape[0])
    finalize_kernel[(-(-C // block_c),)](part, dev, *affine, mean, s, aux, coef, part.shape[0], C, scale.pow_p,
                                         scale.factor, eps, MODE=scale.mode, CENTERED=centered, BN=scale.bn, **flags,
                                         BLOCK_S=block_s, BLOCK_C=block_c, **LAUNCH)


def _finalize_blocks(channels: int, rows: int) -> tuple[int, int]:
    """(channels, partial rows) per tile of the finalize kernels: up to 64 channels, 4096 values."""
    block_c = _pow2_at_most(channels, 64)
    return block_c, _pow2_at_most(rows, max(1, 4096 // block_c))


def _pow2_at_most(n: int, cap: int) -> int:
    """The smallest power of two ≥ n, capped at ``cap`` (a power of two)."""
    return min(cap, 1 << max(0, (n - 1).bit_length()))
