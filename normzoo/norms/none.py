"""No normalization: the identity, accepting the norm constructor contract so ``none`` works wherever a norm does."""

from __future__ import annotations

from typing import Any

from torch import nn

from normzoo.norms.base import NormTraits
from normzoo.spec import NonNegative


class NoNorm(nn.Identity):
    """Identity with the norm constructor signature; has no parameters, buffers or batch dependence."""

    traits = NormTraits(batch_dependent=False, running_stats=False, min_values=1)

    def __init__(self, num_features: int, *, eps: NonNegative = 1e-5, affine: bool = True, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        self.num_features = num_features

    def reset_parameters(self) -> None:
        """Nothing to reset."""

    def extra_repr(self) -> str:
        return str(self.num_features)
