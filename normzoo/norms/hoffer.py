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

from typing import Any

import torch
from torch import Tensor

from normzoo.distributed import ChannelReduce
from normzoo.norms._scale import SQRT_HALF_PI, BatchScaleNorm, ScaleStats, SparseScaleGrad
from normzoo.norms.lp import power_mean_stats, reference_power_mean

_DIMS = (0, 2, 3)


class L1BatchNorm(BatchScaleNorm):
    """L1 batch norm: ``γ (x − µ) / (sqrt(π/2) · mean|x − µ| + eps) + β`` per channel."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True, momentum: float = 0.1,
                 sync: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps=eps, affine=affine, momentum=momentum, sync=sync, device=device,
                         dtype=dtype)

    def _batch_stats(self, x: Tensor) -> ScaleStats:
        return power_mean_stats(x, 1.0, True, SQRT_HALF_PI)

    def _reference_scale(self, x: Tensor, mean: Tensor, reduce: ChannelReduce) -> Tensor:
        return SQRT_HALF_PI * reference_power_mean(x - mean, 1.0, reduce)


class TopKBatchNorm(BatchScaleNorm):
    """Top-k L∞ batch norm: ``γ (x − µ) / (mean of the k largest |x − µ| + eps) + β`` per channel.

    ``k`` is capped at the number of values per channel (N·H·W), so a tiny batch uses them all.
    The gradient flows to the k selected elements (and, through µ, to all).
    """

    def __init__(self, num_features: int, *, k: int = 10, eps: float = 1e-5, affine: bool = True,
                 momentum: float = 0.1, sync: bool = False, device: Any = None, dtype: Any = None) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"topk-bn: k must be a positive integer, got {k}")
        super().__init__(num_features, eps=eps, affine=affine, momentum=momentum, sync=sync, device=device,
                         dtype=dtype)
        self.k = int(k)

    def _batch_stats(self, x: Tensor) -> ScaleStats:
        return topk_stats(x, self.k)

    def _reference_scale(self, x: Tensor, mean: Tensor, reduce: ChannelReduce) -> Tensor:
        return reduce.topk_mean((x - mean).abs(), self.k)

    def extra_repr(self) -> str:
        return f"{self.num_features}, k={self.k}, " + super().extra_repr().split(", ", 1)[1]


def topk_stats(x: Tensor, k: int) -> ScaleStats:
    """Batch mean and the mean of the k largest |x − µ| per channel, with their positions.

    Exact without sorting whole channels: the values of a channel are grouped by spatial position (N values per
    group); each group's largest |x − µ| comes from one pass of max and one of min over the batch. The k largest
    values of the channel all lie in the k groups with the largest group maxima (those k groups hold k values at
    least as large as any value outside them), so only those k·N values are gathered and searched.
    """
    N, C, H, W = x.shape
    hw_count = H * W
    k = min(k, N * hw_count)
    mean = x.mean(_DIMS)
    x3 = x.reshape(N, C, hw_count)
    m = mean[:, None]
    group_max = torch.maximum(x3.amax(0) - m, m - x3.amin(0))  # (C, H·W): largest |x − µ| of each group
    groups = min(k, hw_count)
    group_hw = group_max.topk(groups, dim=1, sorted=False).indices  # (C, groups)
    candidates = x3[:, torch.arange(C, device=x.device)[:, None], group_hw] - m  # (N, C, groups)
    candidates = candidates.permute(1, 0, 2).reshape(C, N * groups)
    top, where = candidates.abs().topk(k, dim=1, sorted=False)  # (C, k), index into N·groups
    scale = top.mean(1)
    n_idx = torch.div(where, groups, rounding_mode="floor")
    hw_idx = group_hw.gather(1, where % groups)
    coef = candidates.gather(1, where).sign() / k
    return ScaleStats(mean, scale, SparseScaleGrad(n_idx, hw_idx, coef, True))
