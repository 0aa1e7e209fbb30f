"""Registers timm's normalization layers as zoo norms through normzoo's ``register_norms`` hook.

Each timm class gets a thin subclass (:func:`bridge`) with normzoo's constructor contract and traits; its spec
parameters are its own keyword parameters plus the timm layer's (read from the signatures by normzoo).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from timm import layers
from torch import nn

from normzoo import NormTraits, hookimpl
from normzoo.norms.group import largest_divisor_at_most
from normzoo.spec import Fraction, NonNegative, PositiveInt

PER_SAMPLE = NormTraits(batch_dependent=False, running_stats=False, min_values=1)
BATCH = NormTraits(batch_dependent=True, running_stats=True, min_values=2)


def bridge(base: type[nn.Module], *, eps: float, traits: NormTraits, affine_switch: bool) -> type[nn.Module]:
    """A subclass of the timm layer ``base`` with normzoo's constructor, traits, (N, C) inputs and mixed dtypes.

    ``affine_switch``: the timm layer takes ``affine=``; otherwise ``affine=False`` freezes weight at 1 and bias
    at 0.
    """
    default_eps = eps

    class TimmNorm(base):  # type: ignore[misc, valid-type]
        def __init__(self, num_features: int, *, eps: NonNegative = default_eps, affine: bool = True,
                     device: Any = None, dtype: Any = None, **params: Any) -> None:
            if "groups" in params:
                params["groups"] = largest_divisor_at_most(num_features, params["groups"])
            switch = {"affine": affine} if affine_switch else {}
            super().__init__(num_features, eps=eps, device=device, dtype=dtype, **switch, **params)
            self.affine = affine
            if not affine and not affine_switch:
                for name in ("weight", "bias"):
                    if getattr(self, name, None) is not None:
                        getattr(self, name).requires_grad_(False)

        def reset_parameters(self) -> None:
            super().reset_parameters()
            with torch.no_grad():  # timm's EvoNorm-B leaves its running variance alone
                for name, buffer in self.named_buffers(recurse=False):
                    if name == "running_var":
                        buffer.fill_(1.0)
                    elif name == "running_mean":
                        buffer.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.dim() == 2
            dtype = next((p.dtype for p in self.parameters()), x.dtype)
            out = super().forward((x[:, :, None, None] if flat else x).to(dtype)).to(x.dtype)
            return out.flatten(1) if flat else out

    TimmNorm.__init__.__signature__ = spec_signature(TimmNorm.__init__, base)  # type: ignore[attr-defined]
    # timm's own parameters get the ranges normzoo checks before building (a spec value outside is one line).
    TimmNorm.__init__.__annotations__.update({name: hint for name, hint in KNOWN_RANGES.items()
                                              if name in TimmNorm.__init__.__signature__.parameters})
    TimmNorm.traits = traits
    # timm computes EvoNorm and FRN statistics in float32 even for float64 input (x.float().var(...)).
    TimmNorm.float32_internals = base.__module__.endswith(("evo_norm", "filter_response_norm"))
    TimmNorm.__name__ = TimmNorm.__qualname__ = f"Zoo{base.__name__}"
    TimmNorm.__doc__ = f"timm's ``{base.__name__}`` with normzoo's constructor contract.\n\n{base.__doc__ or ''}"
    return TimmNorm


# Parameters of timm constructors that are normzoo's own, not expressible in a spec, or not a norm's business.
NOT_SPEC_PARAMS = {"self", "num_features", "num_channels", "channels", "eps", "affine", "device", "dtype",
                   "act_layer", "act_kwargs", "drop_layer", "inplace", "group_size"}


KNOWN_RANGES = {"groups": PositiveInt, "momentum": Fraction}


def spec_signature(init: Any, base: type[nn.Module]) -> inspect.Signature:
    """The bridge's own signature plus the timm layer's defaulted keywords, as the spec parameters to offer."""
    own = list(inspect.signature(init).parameters.values())[:-1]  # without **params
    taken = {p.name for p in own}
    extra = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(base.__init__).parameters.values()
             if p.name not in NOT_SPEC_PARAMS | taken and p.default is not p.empty
             and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return inspect.Signature(own + extra)


# zoo name -> (timm class, traits, the layer takes affine=, summary). FilterResponseNormAct2d is left out: it is
# FRN followed by a plain ReLU, which a backbone's in-place ReLU right after it breaks in backward, and without
# its activation it is timm-frn:apply_act=false.
TIMM_NORMS: dict[str, tuple[str, NormTraits, bool, str]] = {
    "timm-evonorm-b0": ("EvoNorm2dB0", BATCH, False, "EvoNorm-B0: batch variance and instance std, with its act"),
    "timm-evonorm-b1": ("EvoNorm2dB1", BATCH, False, "EvoNorm-B1 (batch variance, with its act)"),
    "timm-evonorm-b2": ("EvoNorm2dB2", BATCH, False, "EvoNorm-B2 (batch variance, with its act)"),
    "timm-evonorm-s0": ("EvoNorm2dS0", PER_SAMPLE, False, "EvoNorm-S0: x·σ(vx) over the group std, per sample"),
    "timm-evonorm-s0a": ("EvoNorm2dS0a", PER_SAMPLE, False, "EvoNorm-S0a (S0, centred group std)"),
    "timm-evonorm-s1": ("EvoNorm2dS1", PER_SAMPLE, False, "EvoNorm-S1 (SiLU over the group std)"),
    "timm-evonorm-s1a": ("EvoNorm2dS1a", PER_SAMPLE, False, "EvoNorm-S1a"),
    "timm-evonorm-s2": ("EvoNorm2dS2", PER_SAMPLE, False, "EvoNorm-S2 (SiLU over the group RMS)"),
    "timm-evonorm-s2a": ("EvoNorm2dS2a", PER_SAMPLE, False, "EvoNorm-S2a"),
    "timm-frn": ("FilterResponseNormTlu2d", PER_SAMPLE, False, "Filter Response Normalization with its TLU"),
    "timm-layernorm2d": ("LayerNorm2d", PER_SAMPLE, True, "LayerNorm over channels at each position"),
    "timm-rmsnorm2d": ("RmsNorm2d", PER_SAMPLE, True, "RMSNorm over channels at each position"),
    "timm-simplenorm2d": ("SimpleNorm2d", PER_SAMPLE, True, "RMS scaling over channels without centring"),
    "timm-groupnorm1": ("GroupNorm1", PER_SAMPLE, True, "GroupNorm with one group (C, H, W per sample)"),
}
REFERENCES = {"evonorm": "Liu et al. 2020, arXiv:2004.02967", "frn": "Singh & Krishnan 2020, arXiv:1911.09737"}


def default_eps(cls: type[nn.Module]) -> float:
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            parameter = inspect.signature(klass.__init__).parameters.get("eps")
            if parameter is not None and isinstance(parameter.default, float):
                return parameter.default
    return 1e-5


_BRIDGED: dict[str, type[nn.Module]] = {}


def bridged(class_name: str) -> type[nn.Module] | None:
    """The zoo class for timm's layer ``class_name`` (made once), or None when this timm lacks the layer.

    Also reachable as the module attribute ``Zoo<class_name>``, so that normzoo can name it by import path and
    build it in a later process without running this plugin's hook.
    """
    if class_name not in _BRIDGED:
        base = getattr(layers, class_name, None)
        if base is None:  # an older or newer timm without this layer
            return None
        _, traits, affine_switch, _ = next(v for v in TIMM_NORMS.values() if v[0] == class_name)
        _BRIDGED[class_name] = bridge(base, eps=default_eps(base), traits=traits, affine_switch=affine_switch)
    return _BRIDGED[class_name]


def __getattr__(name: str) -> Any:
    if name.startswith("Zoo") and any(v[0] == name[3:] for v in TIMM_NORMS.values()):
        found = bridged(name[3:])
        if found is not None:
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_norms(register: Any) -> None:
    for name, (class_name, _traits, _affine_switch, summary) in TIMM_NORMS.items():
        norm = bridged(class_name)
        if norm is None:
            continue
        reference = next((ref for key, ref in REFERENCES.items() if key in name), f"timm.layers.{class_name}")
        register(name, norm, summary=f"{summary} (timm {class_name})", reference=reference)
