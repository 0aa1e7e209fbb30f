"""He et al. 2016 (arXiv:1512.03385, §4.2) CIFAR ResNets: 6n+2 weighted layers.

A 3×3 conv with 16 channels, three stages of n basic blocks (two 3×3 convs each) with 16, 32 and 64 channels
(× ``width``) on 32×32, 16×16 and 8×8 maps, global average pooling and one fully connected layer:
1 + 6n + 1 layers. The shortcuts are option A (parameter free): identity, or, where a stage halves the map and
widens the channels, stride-2 subsampling plus zero channels (split evenly before and after, as in the common
reference implementation). ResNet-110 is Bjorck et al.'s (2018) network.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normzoo.backbones import norm_and_bias, scaled
from normzoo.errors import NormzooError
from normzoo.spec import Width

DEPTHS = (20, 56, 110)
"""Registered depths (any 6n+2 works with :func:`build_resnet`)."""


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channel dimension (no parameters)."""

    def __init__(self, stride: int, pad_front: int, pad_back: int) -> None:
        super().__init__()
        self.stride, self.pad_front, self.pad_back = stride, pad_front, pad_back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_front}, {self.pad_back})"


class BasicBlock(nn.Module):
    """conv3×3 → norm → ReLU → conv3×3 → norm, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer: Any, dd: dict[str, Any]) -> None:
        super().__init__()
        self.norm1, bias1 = norm_and_bias(norm_layer, planes, **dd)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias1, **dd)
        self.act1 = nn.ReLU()
        self.norm2, bias2 = norm_and_bias(norm_layer, planes, **dd)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias2, **dd)
        self.act2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            extra = max(0, planes - in_planes)
            self.shortcut: nn.Module = ShortcutA(stride, extra // 2, extra - extra // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """``conv1``/``norm1``/``act1`` stem, ``layer1``-``layer3`` of basic blocks, ``pool``, ``fc``."""

    def __init__(self, depth: int, norm_layer: Any, num_classes: int, in_chans: int, width: float,
                 dd: dict[str, Any]) -> None:
        super().__init__()
        n = (depth - 2) // 6
        planes = [scaled(c, width) for c in (16, 32, 64)]
        self.norm1, bias = norm_and_bias(norm_layer, planes[0], **dd)
        self.conv1 = nn.Conv2d(in_chans, planes[0], 3, stride=1, padding=1, bias=bias, **dd)
        self.act1 = nn.ReLU()
        in_planes = planes[0]
        stages = []
        for i, p in enumerate(planes):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, p, 2 if (i > 0 and j == 0) else 1, norm_layer, dd))
                in_planes = p
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    def get_classifier(self) -> nn.Module:
        return self.fc


def build_resnet(depth: int, *, norm_layer: Any, num_classes: int = 10, in_chans: int = 3, width: Width = 1.0,
                 device: Any = None, dtype: Any = None) -> CifarResNet:
    """Build the CIFAR ResNet with ``depth`` = 6n+2 layers (20, 32, 44, 56, 110, ...).

    width: multiplies the 16/32/64 stage widths (at least 1 channel). Convs get Kaiming-normal init (fan_out,
    ReLU) and a bias only when no norm follows them; the final Linear keeps PyTorch's default init.
    """
    if depth < 8 or (depth - 2) % 6:
        raise NormzooError(f"CIFAR ResNet depth must be 6n+2 with n ≥ 1 (20, 32, 44, 56, 110, ...), got {depth}")
    if not width > 0:
        raise NormzooError(f"resnet: width must be > 0, got {width}")
    if num_classes < 1 or in_chans < 1:
        raise NormzooError(f"resnet: num_classes and in_chans must be ≥ 1, got {num_classes} and {in_chans}")
    model = CifarResNet(depth, norm_layer, num_classes, in_chans, width, {"device": device, "dtype": dtype})
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
