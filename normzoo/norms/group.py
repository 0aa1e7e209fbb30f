"""Per-sample norms: group (Wu & He 2018), layer (Ba et al. 2016) and instance (Ulyanov et al. 2016) norm.

All three are ``torch.nn.GroupNorm`` with a different number of groups (1 for layer norm, one per channel for
instance norm), so they share torch's kernel, take (N, C) and (N, C, H, W) inputs (an (N, C) input is treated as
(N, C, 1, 1)), behave the same in train and eval mode and keep no running statistics. The affine γ, β is per
channel. Half/bfloat16 inputs use torch's mixed-precision kernel (statistics in float32).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normzoo.norms.base import NormTraits
from normzoo.spec import NonNegative, PositiveInt

_TRAITS = NormTraits(batch_dependent=False, running_stats=False, min_values=2)


def largest_divisor_at_most(num_features: int, groups: int) -> int:
    """The largest divisor of ``num_features`` that is at most ``groups`` (``gn:32`` on 48 channels uses 24)."""
    for g in range(min(groups, num_features), 0, -1):
        if num_features % g == 0:
            return g
    return 1


class _GroupStatNorm(nn.GroupNorm):
    traits = _TRAITS

    def __init__(self, num_features: int, num_groups: int, eps: float, affine: bool, device: Any,
                 dtype: Any) -> None:
        super().__init__(num_groups, num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 4):
            raise ValueError(f"{type(self).__name__} expects (N, C) or (N, C, H, W) input, got shape "
                             f"{tuple(x.shape)}")
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class GroupNorm(_GroupStatNorm):
    """Group norm: per sample, over the channels of each group and H, W.

    ``groups`` is a maximum: when ``num_features`` is not divisible by it, the largest divisor of
    ``num_features`` not above it is used (so ``gn:32`` can be injected into narrow networks: 48 channels
    get 24 groups, 10 channels get 10). ``num_groups`` holds the number actually used.
    """

    def __init__(self, num_features: int, *, groups: PositiveInt = 32, eps: NonNegative = 1e-5, affine: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        if groups < 1:
            raise ValueError(f"gn: groups must be a positive integer, got {groups}")
        super().__init__(num_features, largest_divisor_at_most(num_features, groups), eps, affine, device, dtype)
        self.groups = groups

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups} (using {self.num_groups}), eps={self.eps}, " \
               f"affine={self.affine}"


class LayerNorm(_GroupStatNorm):
    """Layer norm for conv nets: per sample over C, H, W (group norm with one group), affine per channel."""

    def __init__(self, num_features: int, *, eps: NonNegative = 1e-5, affine: bool = True, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(num_features, 1, eps, affine, device, dtype)


class InstanceNorm(_GroupStatNorm):
    """Instance norm: per sample and channel over H, W (group norm with one group per channel), affine per channel.

    It keeps no running statistics (train and eval mode are the same). On (N, C) input every channel of a
    sample is a group of one value, so the output is the bias β.
    """

    def __init__(self, num_features: int, *, eps: NonNegative = 1e-5, affine: bool = True, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(num_features, num_features, eps, affine, device, dtype)
