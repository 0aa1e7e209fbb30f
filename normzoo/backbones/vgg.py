"""CIFAR-style VGG (Simonyan & Zisserman 2015) as used by Santurkar et al. 2018 for their BatchNorm study.

The layer configurations are torchvision's (``torchvision.models.vgg.cfgs``: 'A' = VGG-11, 'B' = 13, 'D' = 16,
'E' = 19), written out here so that building a VGG does not import torchvision (a test checks they are
equal). Each number is a 3×3 conv (padding 1) followed by the norm and a ReLU; 'M' is a 2×2 max-pool
(``ceil_mode=True``, so inputs smaller than 32×32 such as 28×28 MNIST still reach the head; identical to
torchvision's pooling for sizes divisible by 32). The head is small for 32×32 inputs: adaptive average pool to
1×1, flatten, one ``Linear(last_channels, num_classes)`` — not the 4096-wide ImageNet classifier.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normzoo.backbones import norm_and_bias, scaled
from normzoo.errors import NormzooError
from normzoo.spec import Width

DEPTH_TO_CFG = {11: "A", 13: "B", 16: "D", 19: "E"}
"""VGG depth -> torchvision configuration letter."""

CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
"""torchvision's ``models.vgg.cfgs``: channel counts of the 3×3 convs, 'M' for a max-pool."""


class VGG(nn.Module):
    """``features`` (conv/norm/ReLU/pool stack), global average pool, ``classifier`` (one Linear)."""

    def __init__(self, features: nn.Sequential, classifier: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    def get_classifier(self) -> nn.Module:
        return self.classifier


def vgg_layers(cfg: str, width: float = 1.0) -> list[int | str]:
    """The configuration ``cfg`` with every channel count scaled by ``width`` (at least 1); 'M' = max-pool."""
    if cfg not in CFGS:
        raise NormzooError(f"unknown VGG configuration '{cfg}'; valid: {', '.join(sorted(CFGS))}")
    return [v if v == "M" else scaled(int(v), width) for v in CFGS[cfg]]


def build_vgg(cfg: str, *, norm_layer: Any, num_classes: int = 10, in_chans: int = 3, width: Width = 1.0,
              glorot: bool = False, device: Any = None, dtype: Any = None) -> VGG:
    """Build a CIFAR-style VGG from torchvision's configuration ``cfg`` ('A', 'B', 'D' or 'E').

    width: multiplies every conv's channel count (``vgg11,width=0.25`` for a quick run).
    glorot: Glorot/Xavier-uniform init of all conv and linear weights with zero biases (the paper's setup);
        otherwise convs get Kaiming-normal (fan_out, ReLU) and the classifier N(0, 0.01), biases zero
        (torchvision's VGG init). Norm layers keep their own ``reset_parameters()`` init.
    Convs have a bias only when no norm follows them (``norm_layer`` returned ``nn.Identity``).
    """
    if not width > 0:
        raise NormzooError(f"vgg: width must be > 0, got {width}")
    if num_classes < 1 or in_chans < 1:
        raise NormzooError(f"vgg: num_classes and in_chans must be ≥ 1, got {num_classes} and {in_chans}")
    dd = {"device": device, "dtype": dtype}
    layers: list[nn.Module] = []
    channels = in_chans
    for v in vgg_layers(cfg, width):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            continue
        norm, bias = norm_and_bias(norm_layer, int(v), **dd)
        layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1, bias=bias, **dd), norm, nn.ReLU()]
        channels = int(v)
    model = VGG(nn.Sequential(*layers), nn.Linear(channels, num_classes, **dd))
    if any(p.is_meta for p in model.parameters()):
        return model  # shapes only (a checkpoint's first check): and normal_ on meta imports torch._dynamo
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if glorot:
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
