"""Any timm model (``timm:resnet18``, ``timm:efficientnet_b0``, ...) with its norms swapped for a zoo norm.

Placement, in order:

1. If the model's default build has only channel norms (no token LayerNorms, no fused EvoNorm/FRN layers),
   it is created with ``norm_layer=<the zoo norm>`` so the model places the norm itself (and its own init, e.g.
   ResNet's zero-init of the last norm's γ in each block, applies). That is checked on a throw-away build on
   the ``meta`` device (no memory, no RNG use). The norm_layer handed to timm refuses anything but a channel
   count (no ``act_layer``/``apply_act``/extra positional arguments): a model that would build a norm+act layer
   or a GroupNorm-style ``(groups, channels)`` call from it raises, and is created without ``norm_layer``.
2. Otherwise (or when timm refuses ``norm_layer``), it is created with its default norms.
3. :func:`normzoo.build_model` then puts the norm where the model still has another one, as for every backbone
   (:func:`normzoo.placement.inject`: timm's ``BatchNormAct2d`` layers become ``Sequential(norm, drop, act)``), so
   no original norm remains. Transformers' token LayerNorms are left alone (``inject`` warns about them).

Weights are always random (``pretrained=False``): swapped norms would not match pretrained statistics anyway.
"""

from __future__ import annotations

import difflib
import functools
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from normzoo.errors import NormzooError

# keyword arguments a plain norm constructor may get from a model; everything else means "not a plain norm"
_PLAIN_NORM_KWARGS = frozenset({"eps", "momentum", "affine", "elementwise_affine", "track_running_stats",
                                "device", "dtype"})


class _ChannelNormLayer:
    """The ``norm_layer`` given to timm: only ``norm_layer(num_features, **plain_kwargs)`` is accepted.

    It is deliberately not a class, function or partial, so timm's ``get_norm_act_layer`` (which would turn it
    into a norm+act constructor and drop the activation) refuses it with an error instead.
    """

    def __init__(self, norm_layer: Any) -> None:
        self.norm_layer = norm_layer

    def __call__(self, num_features: Any, *args: Any, **kwargs: Any) -> nn.Module:
        extra = set(kwargs) - _PLAIN_NORM_KWARGS
        if args or extra or not isinstance(num_features, int) or isinstance(num_features, bool):
            raise TypeError(f"normzoo's norm_layer only takes a channel count; got args={args!r}, "
                            f"keywords={sorted(extra)}")
        return self.norm_layer(num_features, device=kwargs.get("device"), dtype=kwargs.get("dtype"))

    def __repr__(self) -> str:
        return f"_ChannelNormLayer({self.norm_layer!r})"


def _check_model_name(model: str) -> None:
    import timm

    if timm.is_model(model):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(model, names, n=5, cutoff=0.6)
    if not close:
        close = timm.list_models(f"*{model}*")[:5]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise NormzooError(f"unknown timm model '{model}'{hint} (timm.list_models() lists all {len(names)})")


@functools.lru_cache(maxsize=64)
def _takes_channel_norm_layer(model: str, in_chans: int) -> bool:
    """Whether ``model``'s default build has only channel norms (so ``norm_layer=`` cannot hit a token norm)."""
    import timm

    from normzoo.placement import _find

    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            probe = timm.create_model(model, pretrained=False, in_chans=in_chans)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: take the safe route
        return False
    return not (_find(probe, "token") or _find(probe, "fused"))


def build_timm(*, model: str = "resnet18", norm_layer: Any, num_classes: int = 10, in_chans: int = 3,
               device: Any = None, dtype: Any = None) -> nn.Module:
    """``timm.create_model(model, pretrained=False, ...)``, given ``norm_layer`` where timm can use it throughout
    (the norms it could not place are swapped by ``build_model``, as for any backbone)."""
    import timm

    _check_model_name(model)
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    with torch.device(device) if device is not None else nullcontext():
        net = None
        if _takes_channel_norm_layer(model, in_chans):
            cpu_rng = torch.get_rng_state()
            try:
                net = timm.create_model(model, norm_layer=_ChannelNormLayer(norm_layer), **kwargs)
            except Exception:  # noqa: BLE001 - timm has no single error type for "norm_layer not supported"
                torch.set_rng_state(cpu_rng)  # the fallback build starts from the same random state
                net = None
        if net is None:
            net = timm.create_model(model, **kwargs)
    if dtype is not None:
        net = net.to(dtype=dtype)
    return net
