"""``build_model``: a backbone spec plus a norm spec to a ready ``nn.Module``.

``build_model("vgg11,width=0.25", "lp:inf")`` resolves the backbone through the backbone registry (built-ins
and plugins alike), hands the builder a :class:`normzoo.NormLayer` for the norm, and then calls
:func:`normzoo.placement.inject`, the one mechanism that puts a norm into a model, so that a builder that
ignored ``norm_layer`` (or could use it only in part, as timm's models) still ends up with the norm (its norms
swapped, or the norm inserted after each conv/linear if it has none). The result carries
``model.normzoo_config``, a JSON-able dict from which ``build_model(**config)`` rebuilds the same architecture.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from normzoo.errors import PluginError
from normzoo.spec import Spec

if TYPE_CHECKING:
    from normzoo.registries import Resolved

__all__ = ["build_model"]


def _accepts(factory: Any, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_model(backbone: str | Spec | Resolved = "vgg11", norm: str | Spec | Resolved = "bn", *,
                num_classes: int = 10, in_chans: int = 3, device: Any = None) -> nn.Module:
    """Build ``backbone`` (e.g. ``"vgg11"``, ``"resnet20,width=0.5"``, ``"timm:resnet18"``, ``"dln"``) with
    the norm ``norm`` (e.g. ``"bn"``, ``"lp:inf"``, ``"gn:8"``, ``"none"``).

    The model is built directly on ``device`` when the builder accepts a ``device`` argument (all built-ins
    do), else built on the CPU and moved. Weights come from torch's global RNG, so ``torch.manual_seed``
    makes the build reproducible. ``model.normzoo_config`` holds the canonical backbone and norm specs,
    ``num_classes`` and ``in_chans``: ``build_model(**model.normzoo_config)`` rebuilds the same architecture
    (same state-dict keys and shapes).
    """
    from normzoo.norms.base import NormLayer
    from normzoo.placement import inject
    from normzoo.plugins import registry

    builder = registry("backbones").resolve(backbone)
    norm_layer = NormLayer(norm)  # the norm is resolved once, here, for every layer built from it
    num_classes, in_chans = int(num_classes), int(in_chans)
    if num_classes < 1 or in_chans < 1:
        raise ValueError(f"num_classes and in_chans must be ≥ 1, got {num_classes} and {in_chans}")
    device = torch.device(device) if device is not None else None
    kwargs: dict[str, Any] = {"norm_layer": norm_layer, "num_classes": num_classes, "in_chans": in_chans}
    builds_on_device = device is not None and _accepts(builder.entry.factory, "device")
    if builds_on_device:
        kwargs["device"] = device
    model = builder.build(**kwargs)
    if not isinstance(model, nn.Module):
        raise PluginError(f"backbone '{builder.family}' ({builder.entry.origin}) returned "
                          f"{type(model).__name__}, not an nn.Module")
    if device is not None and not builds_on_device:
        model = model.to(device)
    # The one place a norm enters a model: the builder placed what it could through norm_layer; every norm it
    # left of another kind is swapped, and a model with no norms gets one after each conv/linear layer.
    model = inject(model, norm_layer)
    model.normzoo_config = {"backbone": builder.canonical, "norm": norm_layer.resolved.canonical,
                            "num_classes": num_classes, "in_chans": in_chans}
    return model
