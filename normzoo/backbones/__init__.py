"""normzoo's built-in model builders (registered in ``normzoo.default_plugins.backbones``).

Every builder follows the ``register_backbones`` contract: ``builder(*, norm_layer, num_classes, in_chans,
device=None, dtype=None, **spec_params)`` where ``norm_layer(num_features, device=..., dtype=...)`` returns the
chosen norm module (``nn.Identity`` for ``none``). Use :func:`normzoo.build_model` to build from spec strings.

- :mod:`normzoo.backbones.vgg` — CIFAR-style VGG-11/13/16/19;
- :mod:`normzoo.backbones.resnet_cifar` — He et al.'s CIFAR ResNets (6n+2 layers, option-A shortcuts);
- :mod:`normzoo.backbones.timm_models` — any timm model, its norms swapped;
- :mod:`normzoo.backbones.dln` — the deep linear network of Santurkar et al.

torchvision and timm are imported lazily inside the builders that need them; torch is imported on import.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def norm_and_bias(norm_layer: Any, channels: int, **factory_kwargs: Any) -> tuple[nn.Module, bool]:
    """Build the norm that follows a conv/linear layer, and whether that layer needs its own bias.

    The layer keeps a bias only when no norm follows it (``norm_layer`` returned ``nn.Identity``): a norm's
    mean subtraction (or its β) makes a preceding bias redundant.
    """
    norm = norm_layer(channels, **factory_kwargs)
    if not isinstance(norm, nn.Module):
        raise TypeError(f"norm_layer {norm_layer!r} returned {type(norm).__name__}, not an nn.Module")
    return norm, isinstance(norm, nn.Identity)


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))
