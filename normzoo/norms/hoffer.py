"""The L1 and top-k L∞ batch norms of Hoffer et al. 2018 ("Norm matters: efficient and accurate normalization
schemes in deep networks", arXiv:1803.01814).

Both subtract the per-channel batch mean µ (over the batch and spatial positions) and divide by a per-channel
scale of ``z = x − µ`` other than the standard deviation, then apply the affine γ, β:

* ``l1-bn``: ``s = sqrt(π/2) · mean |z|``. For Gaussian activations sqrt(π/2)·E|z| = σ, so it matches BN in
  expectation. It is ``lp:1,centered=true`` times that constant and shares its kernels.
* ``topk-bn:k``: ``s = mean of the k largest |z|`` (k capped at the number of values per channel). No constant
  rescales it towards σ: for Gaussian activations the top-k mean grows with the number of values per channel,
  so the normalized activations are smaller than BN's and the affine γ has to absorb that. ``topk-bn:1`` is
  ``lp:inf,centered=true``.

Eval mode uses running estimates of µ and s (exponential moving averages, ``momentum``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from normzoo.norms._scale import SQRT_HALF_PI, BatchScaleNorm, ScaleSpec, ScaleStats, SparseScaleGrad, channel_sum
from normzoo.spec import Fraction, NonNegative, PositiveInt


class L1BatchNorm(BatchScaleNorm):
    """L1 batch norm: ``γ (x − µ) / (sqrt(π/2) · mean|x − µ| + eps) + β`` per channel."""

    def __init__(self, num_features: int, *, eps: NonNegative = 1e-5, affine: bool = True, momentum: Fraction = 0.1,
                 sync: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps=eps, affine=affine, momentum=momentum, sync=sync, device=device,
                         dtype=dtype)
        self.scale_spec = ScaleSpec("power", 1.0, True, SQRT_HALF_PI)


class TopKBatchNorm(BatchScaleNorm):
    """Top-k L∞ batch norm: ``γ (x − µ) / (mean of the k largest |x − µ| + eps) + β`` per channel.

    ``k`` is capped at the number of values per channel (N·H·W), so a tiny batch uses them all.
    The gradient flows to the k selected elements (and, through µ, to all).
    """

    def __init__(self, num_features: int, *, k: PositiveInt = 10, eps: NonNegative = 1e-5, affine: bool = True,
                 momentum: Fraction = 0.1, sync: bool = False, device: Any = None, dtype: Any = None) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"topk-bn: k must be a positive integer, got {k}")
        super().__init__(num_features, eps=eps, affine=affine, momentum=momentum, sync=sync, device=device,
                         dtype=dtype)
        self.k = int(k)
        self.scale_spec = ScaleSpec("topk", math.inf, True, 1.0, self.k)

    def extra_repr(self) -> str:
        return f"{self.num_features}, k={self.k}, " + super().extra_repr().split(", ", 1)[1]


def topk_stats(x: Tensor, k: int) -> ScaleStats:
    """Batch mean and the mean of the k largest |x − µ| per channel, with their positions.

    Exact without sorting whole channels: the values of a channel are grouped into blocks of b samples at one
    spatial position; each group's largest |x − µ| comes from one pass of max and one of min over the sample
    blocks. The k largest values of the channel all lie in the k groups with the largest group maxima (those k
    groups hold k values at least as large as any value outside them), so only those k·b values are gathered and
    searched. b (a divisor of N near sqrt(N·H·W / 2k)) balances the search over the (N/b)·H·W group maxima
    against the one over the k·b candidates.
    """
    N, C, H, W = x.shape
    hw = H * W
    k = min(k, N * hw)
    mean = channel_sum(x) / (N * hw)
    b = _sample_block(N, hw, k)
    blocks = x.reshape(N // b, b, C, hw)
    # Each group's largest |x − µ| is max(max − µ, µ − min); ranking within a channel, max(max, 2µ − min) does.
    # Written channel-major (C, N/b, H·W) so that each channel's groups are one row.
    group_max = x.new_empty(C, N // b, hw)
    torch.maximum(blocks.amax(1), blocks.amin(1).neg_().add_(2 * mean.view(1, C, 1)), out=group_max.transpose(0, 1))
    groups = min(k, group_max[0].numel())
    group = group_max.view(C, -1).topk(groups, dim=1, sorted=False).indices  # (C, groups): block · H·W + position
    block, position = _divmod(group, hw)
    c = torch.arange(C, device=x.device)[:, None]
    candidates = blocks.permute(0, 2, 3, 1)[block, c, position]  # (C, groups, b)
    candidates = candidates.view(C, groups * b).sub_(mean[:, None])
    top, where = candidates.abs().topk(k, dim=1, sorted=False)  # (C, k), index into groups·b
    scale = top.mean(1)
    chosen, sample = _divmod(where, b)
    n_idx = block.gather(1, chosen).mul_(b).add_(sample)
    hw_idx = position.gather(1, chosen)
    coef = candidates.gather(1, where).sign_().div_(k)
    return ScaleStats(mean, scale, SparseScaleGrad(n_idx, hw_idx, coef, True))


def _divmod(t: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Quotient and remainder of a non-negative integer tensor by d (shifts for a power of two: CPU's integer
    division is slow)."""
    if d & (d - 1) == 0:
        return t >> (d.bit_length() - 1), t & (d - 1)
    quotient = t // d
    return quotient, t - quotient * d


def _sample_block(N: int, hw: int, k: int) -> int:
    """The divisor of N closest (in ratio) to sqrt(N·hw / 2k): samples per group in :func:`topk_stats`."""
    target = math.sqrt(N * hw / (2 * k))
    return min((b for b in range(1, N + 1) if N % b == 0), key=lambda b: (abs(math.log(b / target)), -b))
