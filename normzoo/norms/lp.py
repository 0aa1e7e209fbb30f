"""ℓp batch normalization (Santurkar et al. 2018, "How Does Batch Normalization Help Optimization?", §3.3).

Per channel, over the batch and the spatial positions: subtract the batch mean µ and divide by the power mean
``M_p(z) = (mean |z|^p)^(1/p)`` (``M_∞ = max |z|``) of ``z = x`` (the paper's "before shifting the mean", the
default) or of ``z = x − µ`` (``centered=true``), then the affine γ, β::

    y = γ · (x − µ) / (M_p(z) + eps) + β

``lp:2,centered=true`` is batch norm with the eps outside the square root. Eval mode uses running estimates of µ
and of the scale M_p (exponential moving averages, no Bessel correction). At p = ∞ the gradient of the max is
taken at one maximizing element (a subgradient).

The backward is analytic (see ``normzoo.norms._scale``); p = 1, 2 and ∞ have dedicated eager code paths that avoid
``pow`` and extra passes, any other p ≥ 1 goes through ``pow``; on CUDA every p runs in the fused kernels of
``normzoo.kernels``. ``LpNorm.reference_forward`` is the same computation in plain autograd ops.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from torch import Tensor

from normzoo.distributed import ChannelReduce
from normzoo.errors import SpecError
from normzoo.norms._scale import (
    BatchScaleNorm,
    LinearScaleGrad,
    PowerScaleGrad,
    ScaleSpec,
    ScaleStats,
    SignScaleGrad,
    SparseScaleGrad,
    channel,
    channel_grad_sums,
    channel_sum,
    nan_free_reciprocal,
)
from normzoo.spec import Fraction, NonNegative, Range

_DIMS = (0, 2, 3)
# Finite p above 8 overflows float32 powers |x|^p for activations past ~6.5e4; p = inf is the max itself.
Power = Annotated[float, Range(1, 8, inf=True)]


def power_mean_stats(x: Tensor, p: float, centered: bool, factor: float = 1.0) -> ScaleStats:
    """Batch mean and ``factor · M_p(z)`` per channel of a (N, C, H, W) tensor, with ds/dx for the backward."""
    N, C, H, W = x.shape
    n = N * H * W
    if p == 2.0 and centered:
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)  # ATen's two-pass BN statistics
        scale = var.clamp_min(0).sqrt() * factor
        return ScaleStats(mean, scale, LinearScaleGrad(nan_free_reciprocal(scale, factor**2 / n), mean))
    if p == 2.0:
        # Σx and Σx² in one fused pass (ATen's batch-norm backward kernel with x as both operands)
        sum_x, sum_sq = channel_grad_sums(x, x, x.new_zeros(C), x.new_ones(C))
        scale = sum_sq.clamp_min(0).sqrt() * (factor / math.sqrt(n))
        return ScaleStats(sum_x / n, scale, LinearScaleGrad(nan_free_reciprocal(scale, factor**2 / n), None))
    mean = channel_sum(x) / n
    if math.isinf(p):
        return _max_stats(x, mean, centered, factor)
    work = torch.sub(x, channel(mean)) if centered else None
    scratch = None
    if x.device.type == "cpu":
        # |z|^p into a fresh tensor (in place over x − µ), summed: ATen's CPU vector_norm does not vectorize
        # this reduction. The forward then writes the output over it straight from x.
        scratch, work = (torch.abs(x) if work is None else work.abs_()), None
        power_sum = channel_sum(scratch if p == 1.0 else scratch.pow_(p))
        scale = power_sum * (factor / n) if p == 1.0 else (power_sum / n).pow_(1 / p) * factor
    else:
        scale = torch.linalg.vector_norm(x if work is None else work, p, _DIMS) * (factor / n ** (1 / p))
    if p == 1.0:
        return ScaleStats(mean, scale, SignScaleGrad(factor / n, centered), work, scratch)
    # ds/dz_k = factor · M^(1−p) |z_k|^(p−1) sign(z_k) / n = factor^p · s^(1−p) · w_k / n
    kappa = torch.where(scale > 0, factor**p * scale.clamp_min(torch.finfo(scale.dtype).tiny) ** (1 - p) / n,
                        torch.zeros_like(scale))
    return ScaleStats(mean, scale, PowerScaleGrad(kappa, p, centered), work, scratch)


def _max_stats(x: Tensor, mean: Tensor, centered: bool, factor: float) -> ScaleStats:
    """``M_∞`` with the position of one maximizing element per channel.

    Maxima and minima are first taken over the batch (one pass each, giving (C, H·W) tables), so the winning
    spatial position is read from a small table and its sample from one gathered column.
    """
    N, C, H, W = x.shape
    x3 = x.reshape(N, C, H * W)
    top, top_hw = x3.amax(0).max(1)
    low, low_hw = x3.amin(0).min(1)
    upper, lower = (top - mean, mean - low) if centered else (top, -low)
    use_top = upper >= lower
    scale = torch.where(use_top, upper, lower) * factor
    hw = torch.where(use_top, top_hw, low_hw)
    column = x3[:, torch.arange(C, device=x.device), hw]  # (N, C): the winning spatial position's values
    n_idx = torch.where(use_top, column.argmax(0), column.argmin(0))
    sign = torch.where(use_top, 1.0, -1.0).to(x.dtype) * factor
    return ScaleStats(mean, scale, SparseScaleGrad(n_idx[:, None], hw[:, None], sign[:, None], centered))


class LpNorm(BatchScaleNorm):
    """Batch ℓp normalization: ``γ (x − µ) / (M_p(z) + eps) + β`` per channel (see the module docstring).

    ``p`` is 1, 2, inf or any p ≥ 1; ``centered`` takes the power mean of ``x − µ`` instead of ``x``.
    """

    def __init__(self, num_features: int, *, p: Power = 2.0, centered: bool = False, eps: NonNegative = 1e-5,
                 affine: bool = True, momentum: Fraction = 0.1, sync: bool = False, device: Any = None,
                 dtype: Any = None) -> None:
        p = float(p)
        if math.isnan(p) or p < 1.0:
            raise SpecError(f"lp: p must be >= 1 (1, 2, inf or any p >= 1), got {p}; "
                            "M_p with p < 1 is not a norm")
        super().__init__(num_features, eps=eps, affine=affine, momentum=momentum, sync=sync, device=device,
                         dtype=dtype)
        self.p = p
        self.centered = bool(centered)
        self.scale_spec = ScaleSpec("power", p, self.centered)

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p}, centered={self.centered}, " + super().extra_repr().split(", ", 1)[1]


def reference_power_mean(z: Tensor, p: float, reduce: ChannelReduce | None = None) -> Tensor:
    """``M_p(z)`` per channel of (N, C, H, W) as (1, C, 1, 1), in plain autograd ops (reductions by ``reduce``)."""
    reduce = reduce or ChannelReduce()
    if math.isinf(p):
        return reduce.amax(z.abs())
    return reduce.mean(z.abs().pow(p)).pow(1 / p)
