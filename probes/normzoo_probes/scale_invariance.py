"""Which weights a normalization makes scale-invariant, found by trying it rather than by a table of norms.

A layer whose output is normalized before anything else sees it is scale-invariant in its weight w: the network
computes the same function at c·w for every c > 0. Then ∇L(cw) = ∇L(w)/c and ⟨∇L(w), w⟩ = 0 (Euler), so plain
SGD's step η·∇L moves the direction w/‖w‖ by η/‖w‖² in angular units: the *effective learning rate*
(van Laarhoven 2017, "L2 Regularization versus Batch and Weight Normalization"; Lyu, Li & Arora, NeurIPS 2022,
"Understanding the Generalization Benefit of Normalization Layers: Sharpness Reduction").

The check: multiply only that layer's weight by c = 2 and compare the model's output on the probe batch, in train
mode, with the unscaled output: ``gap`` = ‖f(2w) − f(w)‖ / ‖f(w)‖, scale-invariant iff gap ≤ tol. Every forward
replays the same RNG state, so noisy-bn and dropout see the same draws. c = 2 is a power of two, so the scaled
weight and the layer's output are exact in floating point and the gap measures the function, not rounding.

The network output rather than the loss: at initialization the logits are small and cross-entropy barely moves
when they double (≈ ln C either way), so a loss test would need a tolerance finer than the effect of a norm's eps,
whereas the output of a non-invariant layer changes by O(1) (doubling a conv in a ReLU network without norms
doubles the logits). An invariant output implies an invariant loss.

What it finds (tests/test_probes_effective_lr.py checks the first five on a small VGG-11):

- ``none``: no layer (conv biases and ReLU make the network at best positively homogeneous, never invariant);
- ``bn``, ``lp:p``, ``l1-bn``, ``topk-bn``, ``gn``, ``ln``, ``in``: every conv directly followed by the norm.
  normzoo's VGG and ResNet convs have no bias there. A conv bias (timm models, hand-built ones) is harmless
  before norms that subtract a per-channel mean (``bn``, ``in``) but breaks the invariance before ``ln``, ``gn``
  with several channels per group and the uncentered ``lp`` (measured gaps 0.2–0.3 against ~1e-5), which this
  check notices and a table of norms would not;
- ``noisy-bn`` (``where=after`` or ``before``): the same convs: the noise is drawn independently of w and added
  after the normalization, so for each draw the function is invariant; ``noisy-bn:bn=false`` normalizes
  nothing, so no layer;
- the classifier: never (nothing normalizes the logits).

Only approximately, because of the norms' eps: BN computes (x − µ)/√(σ² + eps), so doubling w changes the
output by about (3/8)·eps/σ² relative — negligible (~1e-6) unless a layer's pre-norm variance is tiny, which
weight decay can bring about late in training; the gaps are reported so this can be seen. The answer is computed
once per run (at the probe's first measurement) and cached in the probe object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from normzoo.errors import SpecError
from normzoo.probe import ProbeContext, preserved_state
from normzoo_probes.common import rng_rewinder, to_floats, tracked_layers

FACTOR = 2.0


def check_tol(probe: str, tol: float) -> None:
    if not 0 <= tol < math.inf:
        raise SpecError(f"{probe}: invariance_tol must be a finite number ≥ 0, got {tol}")


def weighted_layers(model: nn.Module, layers: str = "weighted") -> list[tuple[str, nn.Module]]:
    """The tracked modules that own a trainable ``weight`` tensor (the candidates for scale invariance)."""
    return [(name, m) for name, m in tracked_layers(model, layers)
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.requires_grad]


def invariance_gaps(ctx: ProbeContext, layers: Sequence[tuple[str, nn.Module]]) -> list[float]:
    """Per layer, ‖f(w with that layer's weight ×2) − f(w)‖ / ‖f(w)‖ on the probe batch in train mode.

    One forward for the reference and one per layer, without gradients; the model is left untouched.
    """
    model = ctx.model
    gaps = []
    with preserved_state(model, ctx.optimizer), torch.no_grad():
        model.train()
        rewind = rng_rewinder()
        reference = model(ctx.inputs).double()
        scale = torch.linalg.vector_norm(reference).clamp_min(torch.finfo(torch.float64).tiny)
        for _, module in layers:
            module.weight.mul_(FACTOR)
            rewind()
            gaps.append(torch.linalg.vector_norm(model(ctx.inputs).double() - reference) / scale)
            module.weight.div_(FACTOR)  # exact: a power of two
    return to_floats(gaps)


class InvarianceCache:
    """The scale-invariance answer of one run, computed at the first measurement and kept (keyed by the layer
    names, so a different model recomputes it)."""

    def __init__(self, tol: float) -> None:
        self.tol = tol
        self._key: tuple[str, ...] | None = None
        self._gaps: list[float] = []

    def gaps(self, ctx: ProbeContext, layers: Sequence[tuple[str, nn.Module]]) -> list[float]:
        key = tuple(name for name, _ in layers)
        if key != self._key:
            self._gaps, self._key = invariance_gaps(ctx, layers), key
        return self._gaps

    def invariant(self, ctx: ProbeContext, layers: Sequence[tuple[str, nn.Module]]) -> list[bool]:
        return [gap <= self.tol for gap in self.gaps(ctx, layers)]
