"""Mean-only batch normalization (Salimans & Kingma 2016, "Weight Normalization", §2.2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normzoo import NormTraits
from normzoo.distributed import channel_reduce
from normzoo.norms.base import as_channels_first_4d
from normzoo.spec import Fraction, NonNegative


class MeanOnlyBatchNorm(nn.Module):
    """y = γ · (x − µ_B) + β with µ_B the per-channel batch mean in training, a running mean in eval mode.

    The constructor follows normzoo's norm contract: channels first, then keyword-only ``eps``, ``affine``, the
    norm's own parameters (here ``momentum``), ``device`` and ``dtype``. ``eps`` is unused (nothing is divided)
    but part of the contract, so that any norm can stand in for any other. The annotations ``NonNegative`` and
    ``Fraction`` (``Annotated[float, normzoo.spec.Range(...)]``) let normzoo refuse a value out of range in one line
    when the spec is parsed (``mean-bn:momentum=2``), before anything is built.

    ``sync=true`` takes the mean over the batches of all data-parallel replicas (``torchrun``): the reductions of
    ``normzoo.distributed.channel_reduce`` are differentiable collectives when replicas are running and plain
    means otherwise, so one line serves both.
    """

    traits = NormTraits(batch_dependent=True, running_stats=True, min_values=2)

    def __init__(self, num_features: int, *, eps: NonNegative = 1e-5, affine: bool = True, momentum: Fraction = 0.1,
                 sync: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine, self.momentum = num_features, eps, affine, momentum
        self.sync = sync
        self.weight = nn.Parameter(torch.empty(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features, **factory)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.running_mean.zero_()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # (N, C) and (N, C, H, W) alike
        if self.training:
            mean = channel_reduce(self.sync).mean(as_channels_first_4d(x)).flatten()
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        else:
            mean = self.running_mean
        out = x - mean.to(x.dtype).view(shape)
        if self.affine:
            out = out * self.weight.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, affine={self.affine}, momentum={self.momentum}, sync={self.sync}"
