"""Per-layer activation statistics and their drift over training (Santurkar et al. 2018, Fig. 2 and 8).

Santurkar et al. ask whether BatchNorm's benefit comes from keeping each layer's input distribution stable. This
probe records, at the input and output of each normalization layer, the mean and variance of the activations on
the step's batch, and how far they moved since the probe's previous measurement.

- Statistics are per layer over every element (batch, positions and channels), population variance, reduced in
  the activation's precision (float32 at least) and kept in float64.
- Drift is measured per channel, where a distribution shift shows (channels moving in opposite directions cancel
  in a layer-wide mean): ``*_drift_mean`` = mean over channels of |µ_c(t) − µ_c(t_prev)|, ``*_drift_var`` = mean
  over channels of |σ²_c(t) − σ²_c(t_prev)|, t_prev being the previous measurement (``drift_from``). The first
  measurement of a run (or of a resumed run: the previous statistics live in the probe object only) has no drift
  keys; a layer whose channel count changed gets NaN.
- Channels are dim 1 (normzoo's (N, C, ...) layout), the last dim for a Linear and a channels-last LayerNorm.
- One forward, no gradients, in the model's current mode: in train mode that forward updates BN running
  statistics, which :func:`preserved_state` puts back. A module called several times is measured at its first call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from normzoo.probe import Probe, ProbeContext, Values, preserved_state
from normzoo_probes.common import forward_hooks, tracked_layers

SIDES = ("in", "out")


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and population variance (float64; on the activation's device from :meth:`of`, on the CPU
    after :meth:`to_cpu`) of one activation tensor."""

    mean: torch.Tensor
    var: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, channel_dim: int) -> ChannelStats:
        # Reduced in place over the non-channel axes (no float64 copy of the activation: that would cost as much
        # as the forward pass); half precision is upcast, the per-channel results are kept in float64.
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if channel_dim == 1 and x.dim() in (2, 3, 4):  # ATen's batch-norm statistics: 5x faster than var_mean
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        else:
            var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != channel_dim], correction=0)
        return cls(mean.double(), var.double())

    @staticmethod
    def to_cpu(stats: list[ChannelStats]) -> list[ChannelStats]:
        """The statistics on the CPU with one device-to-host copy for all of them (one per tensor would make the
        host wait for the device at every layer)."""
        if not stats:
            return []
        tensors = [t for s in stats for t in (s.mean, s.var)]
        pieces = torch.cat(tensors).cpu().split([t.numel() for t in tensors])
        return [ChannelStats(pieces[2 * i], pieces[2 * i + 1]) for i in range(len(stats))]

    def layer_mean(self) -> float:
        return float(self.mean.mean())

    def layer_var(self) -> float:
        """Variance over all elements: within-channel variance plus the spread of the channel means (every
        channel has the same number of elements)."""
        return float(self.var.mean() + self.mean.var(correction=0))

    def drift(self, previous: ChannelStats) -> tuple[float, float]:
        if previous.mean.shape != self.mean.shape:
            return math.nan, math.nan
        return float((self.mean - previous.mean).abs().mean()), float((self.var - previous.var).abs().mean())


def channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    """The channel axis of ``module``'s input/output ``x``."""
    if x.ndim < 2:
        return 0
    channels_last = isinstance(module, nn.Linear) or (
        isinstance(module, nn.LayerNorm) and not type(module).__name__.endswith("2d"))
    return x.ndim - 1 if channels_last else 1


def _first_tensor(value: object) -> torch.Tensor | None:
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if torch.is_tensor(v)), None)
    return None


class ActivationsProbe(Probe):
    """Per tracked layer, in forward order: ``layers``; ``in_mean``, ``in_var``, ``out_mean``, ``out_var``; after
    the first measurement also ``drift_from`` (the previous measurement's step) and ``in_drift_mean``,
    ``in_drift_var``, ``out_drift_mean``, ``out_drift_var``.

    ``layers=norm`` (default) falls back to the conv/linear layers when the model has no norms (``norm=none``):
    their outputs are what a norm would have received.
    """

    name = "activations"
    report = "normzoo_probes.reports.activations:ActivationsReport"
    summary = "per-layer mean/variance of norm inputs and outputs and their drift since the previous measurement"
    reference = "Santurkar et al. 2018, How Does Batch Normalization Help Optimization?, Fig. 2 and 8"

    def __init__(self, *, layers: str = "norm", **schedule) -> None:
        super().__init__(**schedule)
        self.layers = layers
        self._previous: dict[str, dict[str, ChannelStats]] = {}
        self._previous_step: int | None = None

    def measure(self, ctx: ProbeContext) -> Values:
        tracked = tracked_layers(ctx.model, self.layers)
        if not tracked and self.layers == "norm":
            tracked = tracked_layers(ctx.model, "weighted")
        stats: dict[str, dict[str, ChannelStats]] = {}

        def record(name: str, module: nn.Module, args: tuple, output: object) -> None:
            x, y = _first_tensor(args), _first_tensor(output)
            if name not in stats and x is not None and y is not None:
                stats[name] = {"in": ChannelStats.of(x, channel_dim(module, x)),
                               "out": ChannelStats.of(y, channel_dim(module, y))}

        with preserved_state(ctx.model, ctx.optimizer), torch.no_grad(), forward_hooks(tracked, record):
            ctx.model(ctx.inputs)
        on_cpu = iter(ChannelStats.to_cpu([s[side] for s in stats.values() for side in SIDES]))
        stats = {name: {side: next(on_cpu) for side in SIDES} for name in stats}
        values: Values = {"layers": list(stats)}
        for side in SIDES:
            values[f"{side}_mean"] = [s[side].layer_mean() for s in stats.values()]
            values[f"{side}_var"] = [s[side].layer_var() for s in stats.values()]
        if self._previous_step is not None:
            values["drift_from"] = self._previous_step
            for side in SIDES:
                drifts = [s[side].drift(self._previous[name][side]) if name in self._previous else (math.nan,) * 2
                          for name, s in stats.items()]
                values[f"{side}_drift_mean"] = [d[0] for d in drifts]
                values[f"{side}_drift_var"] = [d[1] for d in drifts]
        self._previous, self._previous_step = stats, ctx.step
        return values
