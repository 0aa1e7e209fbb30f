"""normzoo's built-in normalization layers (registered as norms by ``normzoo.default_plugins.norms``).

Every norm takes ``Norm(num_features, *, <family params>, eps=1e-5, affine=True, [momentum=0.1,] device=None,
dtype=None)``, accepts (N, C) and (N, C, H, W) inputs, owns ``reset_parameters()`` and declares ``traits``.
"""

from normzoo.norms.base import NormTraits
from normzoo.norms.batch import BatchNorm
from normzoo.norms.group import GroupNorm, InstanceNorm, LayerNorm
from normzoo.norms.hoffer import L1BatchNorm, TopKBatchNorm
from normzoo.norms.lp import LpNorm
from normzoo.norms.noisy import NoisyBatchNorm
from normzoo.norms.none import NoNorm

__all__ = [
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "L1BatchNorm",
    "LayerNorm",
    "LpNorm",
    "NoNorm",
    "NoisyBatchNorm",
    "NormTraits",
    "TopKBatchNorm",
]
