"""Gradient and activation magnitudes through depth (Bjorck et al. 2018, "Understanding Batch Normalization").

Bjorck et al. show that without BatchNorm, activations and gradients grow or shrink geometrically with depth
at initialization, so that large learning rates diverge, while BN keeps them of a similar size in every layer.
Both probes work on the step's batch in the model's current mode, inside :func:`preserved_state`, and list
layers in the order their first call runs (a layer that does not run is left out).
"""

from __future__ import annotations

import torch
from torch import nn

from normzoo.probe import Probe, ProbeContext, Values, preserved_state
from normzoo_probes.common import (batch_loss, flat_norm, forward_hooks, gradients, own_params, tracked_layers,
                                  trainable)


class GradNormsProbe(Probe):
    """``layers``; ``grad_norm`` = ‖∇_{W_i} L‖₂ and ``param_norm`` = ‖W_i‖₂ per layer (W_i: the layer's own
    trainable parameters, weight and bias together); ``total_grad_norm`` over all trainable parameters of the
    model; ``loss``. One forward and backward."""

    name = "grad-norms"
    report = "normzoo_probes.reports.depth:GradNormsReport"
    summary = "per-layer gradient norms ‖∇W_i L‖ through depth, and the total gradient norm"
    reference = "Bjorck et al. 2018, Understanding Batch Normalization, §3"

    def __init__(self, *, layers: str = "weighted", **schedule) -> None:
        super().__init__(**schedule)
        self.layers = layers

    def measure(self, ctx: ProbeContext) -> Values:
        tracked = tracked_layers(ctx.model, self.layers)
        order: list[str] = []

        def record(name: str, module: nn.Module, args: tuple) -> None:
            if name not in order:
                order.append(name)

        with preserved_state(ctx.model, ctx.optimizer), torch.enable_grad():
            with forward_hooks(tracked, record, pre=True):
                loss = batch_loss(ctx)
            params = trainable(ctx.model)
            grad_of = {id(p): g for p, g in zip(params, gradients(loss, params))}
        modules = dict(tracked)
        owned = [own_params(modules[name]) for name in order]
        return {"layers": order,
                "grad_norm": [flat_norm([grad_of[id(p)] for p in ps]) for ps in owned],
                "param_norm": [flat_norm(ps) for ps in owned],
                "total_grad_norm": flat_norm(list(grad_of.values())), "loss": float(loss.detach())}


class DepthScalingProbe(Probe):
    """Per layer: ``layers``; ``act_rms`` = √mean(a²) and ``act_mean_abs`` = mean |a| of its output a on the batch;
    ``act_grad_norm`` = ‖∂L/∂a‖₂ over the whole batch tensor (the loss is a batch mean, so this scales like
    1/√batch); ``loss``. One forward and one backward."""

    name = "depth-scaling"
    report = "normzoo_probes.reports.depth:DepthScalingReport"
    summary = "activation magnitudes and output-gradient norms through depth"
    reference = "Bjorck et al. 2018, Understanding Batch Normalization, §3 (explosion with depth without BN)"

    def __init__(self, *, layers: str = "weighted", **schedule) -> None:
        super().__init__(**schedule)
        self.layers = layers

    def measure(self, ctx: ProbeContext) -> Values:
        tracked = tracked_layers(ctx.model, self.layers)
        outputs: dict[str, torch.Tensor] = {}
        magnitudes: dict[str, tuple[float, float]] = {}

        def record(name: str, module: nn.Module, args: tuple, output: object) -> torch.Tensor | None:
            if name in outputs or not torch.is_tensor(output):
                return None
            a = output.detach().double()
            magnitudes[name] = (float(a.square().mean().sqrt()), float(a.abs().mean()))
            outputs[name] = output
            # The rest of the network gets a copy: an in-place op downstream (ReLU(inplace=True)) would
            # otherwise change the tensor whose gradient is asked for.
            return output.clone()

        with preserved_state(ctx.model, ctx.optimizer), torch.enable_grad():
            with forward_hooks(tracked, record):
                loss = batch_loss(ctx)
            live = [a for a in outputs.values() if a.requires_grad]  # frozen layers fed by the input: grad 0
            grad_of = dict(zip(map(id, live), gradients(loss, live) if live else []))
            grads = [grad_of.get(id(a), torch.zeros_like(a)) for a in outputs.values()]
        return {"layers": list(outputs),
                "act_rms": [magnitudes[name][0] for name in outputs],
                "act_mean_abs": [magnitudes[name][1] for name in outputs],
                "act_grad_norm": [flat_norm([g]) for g in grads], "loss": float(loss.detach())}
