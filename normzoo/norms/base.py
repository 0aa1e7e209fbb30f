"""What every zoo norm declares about itself, and the factories that turn a spec into norm modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from normzoo.spec import Spec

if TYPE_CHECKING:
    from normzoo.registries import Resolved


@dataclass(frozen=True)
class NormTraits:
    """Facts about a norm that the runner, probes and conformance tests rely on.

    batch_dependent: the training output of one sample depends on the other samples in the batch.
    running_stats: eval mode uses running estimates accumulated in train mode (buffers).
    min_values: the fewest values per normalized group needed in training (BN needs 2 per channel).
    """

    batch_dependent: bool
    running_stats: bool
    min_values: int = 1


DEFAULT_TRAITS = NormTraits(batch_dependent=True, running_stats=True, min_values=2)


def traits_of(module_or_factory: Any) -> NormTraits:
    """A norm's declared traits; conservative (batch-dependent) when it declares none."""
    return getattr(module_or_factory, "traits", DEFAULT_TRAITS)


def parse_norm(spec: str | Spec | Resolved) -> Spec:
    """Parse and resolve a norm spec such as ``"lp:inf"`` against the registered norms."""
    from normzoo.plugins import registry

    return registry("norms").parse(spec)


def create_norm(spec: str | Spec | Resolved, num_features: int, *, device: Any = None, dtype: Any = None
                ) -> nn.Module:
    """Build one norm module for ``num_features`` channels from a spec (``create_norm("gn:8", 64)``).

    The module carries ``normzoo_spec``, its canonical spec. A :class:`normzoo.registries.Resolved` spec is used
    as it is, so building many layers parses nothing.
    """
    from normzoo.plugins import registry

    resolved = registry("norms").resolve(spec)
    module = resolved.build(num_features, device=device, dtype=dtype)
    module.normzoo_spec = resolved.canonical
    return module


class NormLayer:
    """A ``norm_layer`` callable for model builders (timm's ``norm_layer=`` included).

    ``NormLayer("lp:inf")(64)`` builds an ℓ∞ norm for 64 channels. The spec is resolved once, here; extra keyword
    arguments that timm passes (``eps``, ``momentum``, ...) are ignored in favour of the spec, except ``device``
    and ``dtype``. ``none`` builds ``nn.Identity``.
    """

    def __init__(self, spec: str | Spec | Resolved) -> None:
        from normzoo.plugins import registry

        self.resolved = registry("norms").resolve(spec)

    @property
    def spec(self) -> Spec:
        return self.resolved.spec

    def __call__(self, num_features: int, *args: Any, device: Any = None, dtype: Any = None,
                 **ignored: Any) -> nn.Module:
        if self.resolved.family == "none":
            return nn.Identity()
        return create_norm(self.resolved, num_features, device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"NormLayer({self.resolved.canonical!r})"


def as_channels_first_4d(x: torch.Tensor) -> torch.Tensor:
    """View (N, C) as (N, C, 1, 1) so one code path serves both layouts."""
    return x[:, :, None, None] if x.dim() == 2 else x
