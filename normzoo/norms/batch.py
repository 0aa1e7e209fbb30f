"""Batch normalization (Ioffe & Szegedy 2015, arXiv:1502.03167): torch's own kernel behind the zoo's constructor."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normzoo.distributed import SyncedChannelReduce, sync_active
from normzoo.norms._scale import channel, compute_dtype
from normzoo.norms.base import NormTraits, as_channels_first_4d
from normzoo.spec import Fraction, NonNegative


class BatchNorm(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` that also accepts (N, C) inputs (like ``BatchNorm1d`` without a length dim).

    Train mode normalizes with the biased batch variance and updates the running mean and the unbiased running
    variance; eval mode uses the running estimates. Half/bfloat16 inputs with float32 parameters are handled by
    torch's mixed-precision kernels (statistics in float32, output in the input dtype). State-dict keys are
    ``nn.BatchNorm2d``'s.

    ``sync=true`` normalizes with the statistics of the concatenated batch of all data-parallel replicas
    (``torch.distributed`` on any backend, gloo included); outside a multi-process group it changes nothing.
    """

    traits = NormTraits(batch_dependent=True, running_stats=True, min_values=2)

    def __init__(self, num_features: int, *, eps: NonNegative = 1e-5, affine: bool = True, momentum: Fraction = 0.1,
                 sync: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True,
                         device=device, dtype=dtype)
        self.sync = bool(sync)

    def forward(self, input: Tensor) -> Tensor:
        if self.training and sync_active(self.sync):
            self._check_input_dim(input)
            return self.synced_batch_norm(input, self.weight, self.bias)
        return super().forward(input)

    def synced_batch_norm(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """Train-mode batch norm over every replica's batch, in plain ops around differentiable gathers."""
        reduce = SyncedChannelReduce()
        cdtype = compute_dtype(x.dtype)
        x4 = as_channels_first_4d(x).to(cdtype)
        mean = reduce.mean(x4)
        centered = x4 - mean
        var = reduce.mean(centered.square())  # biased, as in the normalization of nn.BatchNorm2d
        y = centered * torch.rsqrt(var + self.eps)
        if weight is not None:
            y = y * channel(weight.to(cdtype)) + channel(bias.to(cdtype))
        if self.track_running_stats:
            n = reduce.count(x4)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.flatten().to(self.running_mean.dtype), factor)
                unbiased = var.flatten() * (n / max(n - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", sync=True" if self.sync else "")

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"{type(self).__name__} expects (N, C) or (N, C, H, W) input, got shape "
                             f"{tuple(input.shape)}")
