"""Batch normalization (Ioffe & Szegedy 2015, arXiv:1502.03167): torch's own kernel behind the zoo's constructor."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normzoo.norms.base import NormTraits


class BatchNorm(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` that also accepts (N, C) inputs (like ``BatchNorm1d`` without a length dim).

    Train mode normalizes with the biased batch variance and updates the running mean and the unbiased running
    variance; eval mode uses the running estimates. Half/bfloat16 inputs with float32 parameters are handled by
    torch's mixed-precision kernels (statistics in float32, output in the input dtype). State-dict keys are
    ``nn.BatchNorm2d``'s.
    """

    traits = NormTraits(batch_dependent=True, running_stats=True, min_values=2)

    def __init__(self, num_features: int, *, eps: float = 1e-5, affine: bool = True, momentum: float = 0.1,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True,
                         device=device, dtype=dtype)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"{type(self).__name__} expects (N, C) or (N, C, H, W) input, got shape "
                             f"{tuple(input.shape)}")
