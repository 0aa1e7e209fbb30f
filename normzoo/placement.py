"""Put a zoo norm into an existing model: swap its norm modules, or insert norms where it has none.

``inject(model, "lp:inf")`` is the one call most users need:

- a model **with** norm modules has every one of them swapped for the chosen norm (``none`` removes them);
- a model **without** any norm gets the norm inserted after each ``Conv2d``/``Linear`` (before the following
  nonlinearity), except after the final classifier;
- token ``LayerNorm``\\ s of transformers (``nn.LayerNorm`` over the last dimension) are never touched: the
  zoo norms normalize channels of ``(N, C)``/``(N, C, H, W)`` tensors, which is not what those layers see.

Recognised norm modules: torch's BatchNorm (1d/2d/3d, SyncBatchNorm) and InstanceNorm classes, ``GroupNorm``,
channels-first LayerNorms (timm's and torchvision's ``LayerNorm2d``), timm's ``RmsNorm2d``/``SimpleNorm2d``,
frozen BatchNorms, timm's norm+activation layers (``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct2d``,
...) and normzoo's own norms (modules with a ``normzoo_spec`` attribute). A norm+act layer becomes
``nn.Sequential(norm=<new norm>, drop=<its drop>, act=<its activation>)`` so the activation survives (also for
``none``). Replacements keep the replaced module's device, dtype and train/eval mode. Models are changed in
place by recursing over each module's children (every slot, so a module registered twice — shared — is
replaced by one new module in both places), never while iterating ``named_modules()``.
"""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from normzoo.errors import NormzooError
from normzoo.spec import Spec

if TYPE_CHECKING:
    from normzoo.registries import Resolved

__all__ = ["find_norms", "find_token_norms", "final_classifier", "inject", "insert_norms", "is_norm",
           "is_swappable_norm", "replace_norms"]

# Class names (matched anywhere in a module's MRO) of norms that normalize the channel dim of NCHW tensors
# but do not derive from torch's BatchNorm/InstanceNorm/GroupNorm classes.
_CHANNEL_NORM_NAMES = frozenset({
    "LayerNorm2d", "LayerNorm2dFp32", "LayerNormAct2d", "LayerNormAct2dFp32", "LayerNormExp2d",
    "RmsNorm2d", "RmsNorm2dFp32", "RmsNormAct2d", "RmsNormAct2dFp32", "SimpleNorm2d", "SimpleNorm2dFp32",
    "FrozenBatchNorm2d", "FrozenBatchNormAct2d",
})
# Norms over the last (token/feature) dimension: never swapped.
_TOKEN_NORM_NAMES = frozenset({"RmsNorm", "RmsNormFp32", "RmsNormAct", "RmsNormActFp32", "SimpleNorm",
                               "SimpleNormFp32", "RMSNorm"})
# Norms fused with their activation in one computation (no separate act module): not swappable faithfully.
_FUSED_NORM_PREFIXES = ("EvoNorm", "FilterResponseNorm", "InplaceAbn")

NormLayerLike = Callable[..., nn.Module]


def _mro_names(module: nn.Module) -> set[str]:
    return {klass.__name__ for klass in type(module).__mro__}


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (name, child) slot, including repeats of a shared child (``named_children()`` yields it once)."""
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _kind(module: nn.Module) -> str | None:
    """'norm' (swappable), 'token' (last-dim norm, left alone), 'fused' (norm+act in one op) or None."""
    if hasattr(module, "normzoo_spec"):
        return "norm"
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return "norm"
    names = _mro_names(module)
    if names & _CHANNEL_NORM_NAMES:
        return "norm"
    if isinstance(module, nn.LayerNorm) or names & _TOKEN_NORM_NAMES:
        return "token"
    if any(name.startswith(_FUSED_NORM_PREFIXES) for name in names):
        return "fused"
    return None


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` normalizes: a norm normzoo built, any of torch's or timm's channel norms, a token norm
    (``LayerNorm``, ``RmsNorm``) or a norm fused with its activation (EvoNorm, FRN). What probes measure as norms."""
    return _kind(module) is not None or isinstance(module, nn.LocalResponseNorm)


def is_swappable_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm that :func:`inject` swaps: a channel norm (token and fused norms are not)."""
    return _kind(module) == "norm"


def _find(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if _kind(module) == kind:
            found.append((prefix, module))
            return  # a norm-act layer's act/drop children are not norms
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return found


def find_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every swappable norm in ``model``, in module order (shared ones once)."""
    return _find(model, "norm")


def find_token_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The last-dimension (token) norms that :func:`inject` leaves alone."""
    return _find(model, "token")


def _num_features(module: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 1:
        return int(shape[0])
    for attr in ("weight", "running_mean", "bias", "running_var"):
        tensor = getattr(module, attr, None)
        if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1:
            return int(tensor.shape[0])
    raise NormzooError(f"cannot tell how many channels the norm {type(module).__name__} normalizes "
                       "(it has no num_features, num_channels, normalized_shape or weight)")


def _device_dtype(module: nn.Module, default: tuple[Any, Any] = (None, None)) -> tuple[Any, Any]:
    tensors = list(itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)))
    for tensor in tensors:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    if tensors:
        return tensors[0].device, default[1]
    return default


def _model_device_dtype(model: nn.Module) -> tuple[Any, Any]:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def _as_norm_layer(norm: str | Spec | Resolved | NormLayerLike) -> NormLayerLike:
    from normzoo.norms.base import NormLayer
    from normzoo.registries import Resolved

    if isinstance(norm, (str, Spec, Resolved)):
        return NormLayer(norm)
    if not callable(norm):
        raise TypeError(f"expected a norm spec or a norm_layer callable, got {type(norm).__name__}")
    return norm


def _target_spec(norm_layer: NormLayerLike) -> str | None:
    resolved = getattr(norm_layer, "resolved", None)
    return getattr(resolved, "canonical", None)


def _make(norm_layer: NormLayerLike, num_features: int, device: Any, dtype: Any) -> nn.Module:
    module = norm_layer(num_features, device=device, dtype=dtype)
    if not isinstance(module, nn.Module):
        raise NormzooError(f"norm_layer {norm_layer!r} returned {type(module).__name__}, not an nn.Module")
    return module


def _replacement(old: nn.Module, norm_layer: NormLayerLike, default: tuple[Any, Any]) -> nn.Module:
    device, dtype = _device_dtype(old, default)
    new = _make(norm_layer, _num_features(old), device, dtype)
    act = getattr(old, "act", None)
    if isinstance(act, nn.Module) and not hasattr(old, "normzoo_spec"):  # a timm norm+act layer
        drop = getattr(old, "drop", None)
        if getattr(act, "inplace", False):
            act.inplace = False  # the new norm (or, for none, the conv before it) may need its output intact
        new = nn.Sequential(OrderedDict([("norm", new),
                                         ("drop", drop if isinstance(drop, nn.Module) else nn.Identity()),
                                         ("act", act)]))
    return new.train(old.training)


def replace_norms(model: nn.Module, norm_layer: str | Spec | Resolved | NormLayerLike, *,
                  keep: Collection[nn.Module] = ()) -> nn.Module:
    """Swap every norm module of ``model`` for ``norm_layer(num_features)``; returns the (changed) model.

    ``norm_layer`` is a spec (``"gn:8"``) or a callable such as :class:`normzoo.NormLayer`. Norms listed in
    ``keep`` (by identity), and zoo norms that already have the target spec, are left as they are. Token
    LayerNorms are never swapped. The model is changed in place; the return value differs from ``model``
    only when ``model`` itself is a norm.
    """
    norm_layer = _as_norm_layer(norm_layer)
    target = _target_spec(norm_layer)
    keep_ids = {id(m) for m in keep}
    default = _model_device_dtype(model)
    memo: dict[int, nn.Module] = {}

    def swap(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        if (_kind(module) == "norm" and id(module) not in keep_ids
                and not (target is not None and getattr(module, "normzoo_spec", None) == target)):
            memo[id(module)] = new = _replacement(module, norm_layer, default)
            return new
        memo[id(module)] = module
        if _kind(module) != "norm":
            for name, child in _children(module):
                new_child = swap(child)
                if new_child is not child:
                    setattr(module, name, new_child)
        return module

    return swap(model)


def final_classifier(model: nn.Module) -> nn.Module | None:
    """The model's output layer: ``model.get_classifier()`` (timm and normzoo backbones) when it returns a
    module, else the last ``nn.Linear`` in module order, else the last ``nn.Conv2d``; None if there is none."""
    getter = getattr(model, "get_classifier", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # noqa: BLE001 - an odd get_classifier must not break injection
            head = None
        if isinstance(head, nn.Module):
            return head
    last = None
    for layer_type in (nn.Linear, nn.Conv2d):
        for module in model.modules():
            if isinstance(module, layer_type):
                last = module
        if last is not None:
            return last
    return None


def insert_norms(model: nn.Module, norm_layer: str | Spec | Resolved | NormLayerLike, *,
                 classifier: nn.Module | None = None) -> nn.Module:
    """Insert ``norm_layer(out_features)`` after every ``nn.Conv2d`` and ``nn.Linear`` except the classifier.

    Each such layer becomes ``nn.Sequential(layer=<the layer>, norm=<the norm>)`` (so its state-dict keys gain
    ``.layer``). ``classifier`` (default: :func:`final_classifier`) and every module inside it are skipped,
    as are the projections inside ``nn.MultiheadAttention``. ``none`` inserts nothing.
    """
    norm_layer = _as_norm_layer(norm_layer)
    resolved = getattr(norm_layer, "resolved", None)
    if resolved is not None and resolved.family == "none":
        return model
    head = classifier if classifier is not None else final_classifier(model)
    skip = {id(m) for m in head.modules()} if head is not None else set()
    memo: dict[int, nn.Module] = {}

    def visit(module: nn.Module, parent: nn.Module | None) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        if (isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in skip
                and not isinstance(parent, nn.MultiheadAttention)):
            features = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            device, dtype = _device_dtype(module)
            norm = _make(norm_layer, features, device, dtype).train(module.training)
            memo[id(module)] = new = nn.Sequential(OrderedDict([("layer", module), ("norm", norm)]))
            return new.train(module.training)
        memo[id(module)] = module
        for name, child in _children(module):
            new_child = visit(child, module)
            if new_child is not child:
                setattr(module, name, new_child)
        return module

    return visit(model, None)


def inject(model: nn.Module, spec: str | Spec | Resolved | NormLayerLike, *,
           classifier: nn.Module | None = None) -> nn.Module:
    """Give ``model`` the norm ``spec`` (e.g. ``"bn"``, ``"lp:inf"``, ``"none"``); returns the model.

    If the model has norm modules, every one is swapped (:func:`replace_norms`); if it has none, the norm is
    inserted after each conv/linear layer except the final classifier (:func:`insert_norms`). A model whose
    only norms are token LayerNorms (a ViT) is left unchanged with a warning. Changes are made in place.
    """
    norm_layer = _as_norm_layer(spec)
    label = _target_spec(norm_layer) or repr(norm_layer)
    if find_norms(model):
        model = replace_norms(model, norm_layer)
        kept = find_token_norms(model) + _find(model, "fused")
        if kept:
            warnings.warn(f"inject({label}): kept {len(kept)} token/fused norm(s) (e.g. '{kept[0][0]}': "
                          f"{type(kept[0][1]).__name__}); only channel norms are swapped", UserWarning, stacklevel=2)
        return model
    others = find_token_norms(model) + _find(model, "fused")
    if others:
        warnings.warn(f"inject({label}): the model's only norms are {len(others)} token/fused norm(s) "
                      f"(e.g. '{others[0][0]}': {type(others[0][1]).__name__}), which normzoo does not swap; "
                      "the model is unchanged", UserWarning, stacklevel=2)
        return model
    return insert_norms(model, norm_layer, classifier=classifier)
