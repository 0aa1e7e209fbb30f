"""The deep linear network of Santurkar et al. 2018 (§A.2): 25 layers of 10×10, squared loss on y = A x.

``depth`` bias-free ``Linear(width, width)`` layers with no nonlinearity between them, the norm after each one
except the last (``nn.Identity`` in its place for ``none``, so state-dict keys do not depend on the norm:
linear layer i is always ``layers.{2i}``). Weights are Glorot/Xavier-normal (variance 1/width for square
layers), which keeps the signal's scale through depth for ``none``.

The network maps ``width`` inputs to ``width`` outputs; ``in_chans`` and ``num_classes`` are accepted (the
builder contract passes them) but not used: the regression data's dimension must equal ``width``. A mismatch
is reported by ``forward`` with the fix (``dln,width=<features>``).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import nn

from normzoo.errors import NormzooError
from normzoo.spec import Range

Layers = Annotated[int, Range(1, 4096)]


class DeepLinearNetwork(nn.Module):
    """``layers``: Linear, norm, Linear, norm, ..., Linear (``depth`` Linear layers of ``width``×``width``)."""

    def __init__(self, layers: nn.Sequential, width: int) -> None:
        super().__init__()
        self.layers = layers
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.width:
            raise NormzooError(f"dln: inputs have {x.shape[1]} features but the network's width is {self.width}; "
                               f"use dln,width={x.shape[1]}")
        return self.layers(x)

    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]

    def get_classifier(self) -> nn.Module:
        return self.layers[-1]


def build_dln(*, norm_layer: Any, num_classes: int = 10, in_chans: int = 3, depth: Layers = 25, width: Layers = 10,
              device: Any = None, dtype: Any = None) -> DeepLinearNetwork:
    """Build a deep linear network of ``depth`` ``width``×``width`` layers (``in_chans``/``num_classes`` unused)."""
    if depth < 1 or width < 1:
        raise NormzooError(f"dln: depth and width must be ≥ 1, got depth={depth}, width={width}")
    dd = {"device": device, "dtype": dtype}
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(width, width, bias=False, **dd)
        nn.init.xavier_normal_(linear.weight)
        layers.append(linear)
        if i < depth - 1:
            norm = norm_layer(width, **dd)
            if not isinstance(norm, nn.Module):
                raise TypeError(f"norm_layer {norm_layer!r} returned {type(norm).__name__}, not an nn.Module")
            layers.append(norm)
    return DeepLinearNetwork(nn.Sequential(*layers), width)
