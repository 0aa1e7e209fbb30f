"""Sharpness: λ_max of the training loss's Hessian, raw and relative to the optimizer's stability threshold.

Cohen et al. (ICLR 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability") show
that full-batch gradient descent drives the Hessian's top eigenvalue up until it reaches the threshold beyond
which a quadratic with that curvature would make the iteration diverge, then hovers there: at a fixed learning
rate the sharpness training settles at is set by the learning rate. ``relative`` = λ_max / threshold says how
close a run is to that edge (≈ 1 at the edge), so schemes can be compared at their own learning rates.

Thresholds, from the iteration on L = ½λx² (the stability region of the linear recurrence; ``threshold_formula``
names the one used). With η the learning rate and, for PyTorch's SGD, μ the momentum and τ the dampening:

- SGD without momentum: x ← (1 − ηλ)x converges iff 0 < ηλ < 2, so λ_max < **2/η** (Cohen et al. 2021, §2).
- Heavy-ball momentum (PyTorch: b ← μb + (1−τ)g, x ← x − ηb): x_{t+1} = (1 + μ − η(1−τ)λ)x_t − μx_{t−1},
  stable iff 0 < η(1−τ)λ < 2 + 2μ (Jury's criterion on z² − (1 + μ − η(1−τ)λ)z + μ), so **(2 + 2μ)/(η(1−τ))**;
  with τ = 0 this is Cohen et al.'s (2 + 2β)/η (their appendix on momentum; Polyak's heavy-ball region).
- Nesterov (PyTorch: b ← μb + g, x ← x − η(g + μb)): x_{t+1} = (1 + μ)(1 − ηλ)x_t − μ(1 − ηλ)x_{t−1}, stable
  iff 0 < ηλ < (2 + 2μ)/(1 + 2μ), so **(2 + 2μ)/((1 + 2μ)η)** — e.g. 1.36/η at μ = 0.9, not heavy ball's 3.8/η.
- Adam and other adaptive optimizers: no threshold here (their stability concerns the preconditioned Hessian,
  Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability"); NaN with a ``note``. Also NaN for
  η = 0 and μ ≥ 1 (never stable).

Weight decay wd adds wd·I to the Hessian the iteration sees, so strictly the condition is λ_max + wd < threshold;
with wd ~ 5e-4 against thresholds ~ 10 it is ignored, and ``relative`` is λ_max / threshold.

λ_max comes from Lanczos (:mod:`normzoo_probes.lanczos`) on Hessian-vector products (double backward, as the
``hessian`` probe does), warm-started from the previous measurement's top Ritz vector plus a small random part
(kept in the probe object only: a run resumed from a checkpoint starts cold once). ``top=K`` also reports the K
largest eigenvalues.

Which loss: by default the step's batch, in the model's current mode (train mode: batch statistics), i.e. the
Hessian of exactly the loss this step descends. ``samples=N`` uses instead a fixed subset of N training examples
(drawn once from ``seed``, the same at every measurement) so the value is not one batch's noise: the loss is the
mean over the N examples, evaluated in near-equal chunks of at most ``chunk`` examples (default: the training
batch size), each chunk normalized with its own batch statistics — the loss as training sees it, for batches of
that size — and each Hessian-vector product sums the chunks' products, recomputing their graphs (memory bounded
by one chunk; cost ⌈N/chunk⌉ × (forward + backward + double backward) per product). Random layers (dropout,
noisy-bn) see the same draws at every product. The subset is the raw training data: no augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from normzoo.errors import SpecError
from normzoo.probe import Probe, ProbeContext, Values, preserved_state
from normzoo_probes.common import batch_loss, loss_on, rng_rewinder, seeded_generator, trainable
from normzoo_probes.hessian import hvp_operator
from normzoo_probes.lanczos import flat_start, lanczos
from normzoo_probes.stability import sgd_threshold

WARM_NOISE = 0.1  # size of the random part of a warm start, relative to the unit previous Ritz vector


def stability_threshold(optimizer: torch.optim.Optimizer, lr: float) -> tuple[float, str, str | None]:
    """(threshold on λ_max, the formula used, a note when there is none) for ``optimizer`` at learning rate ``lr``
    (momentum, dampening and Nesterov read from its first param group); see the module docstring."""
    if not isinstance(optimizer, torch.optim.SGD):
        if not (lr > 0 and math.isfinite(lr)):
            return math.nan, "none", f"learning rate {lr}: no step, no stability threshold"
        return math.nan, "none", (f"no stability threshold for {type(optimizer).__name__}: adaptive optimizers are "
                                  "stable with respect to the preconditioned Hessian, not this one")
    group = optimizer.param_groups[0]
    return sgd_threshold(lr, float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0)),
                         bool(group.get("nesterov", False)))


class SharpnessProbe(Probe):
    """``eigenvalue`` (λ_max of the Hessian of the training loss), ``eigenvalues`` (the ``top`` largest, when
    top > 1), ``threshold``, ``relative`` = eigenvalue / threshold, ``threshold_formula``, ``lr``, ``momentum``,
    ``loss``, ``samples`` (examples the loss is over), ``iterations``, ``converged``, ``warm_start``; ``note`` when
    the threshold is NaN.

    Cost: one forward+backward with graph, then one double backward per iteration (``iters`` at most); with
    ``samples=N`` each iteration costs ⌈N/chunk⌉ forward+backward+double backward passes.
    """

    name = "sharpness"
    report = "normzoo_probes.reports.sharpness:SharpnessReport"
    summary = "λ_max of the loss Hessian (Lanczos) and λ_max / stability threshold (2/lr, (2+2μ)/lr)"
    reference = ("Cohen et al. 2021, Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability "
                 "(ICLR); Lanczos with full reorthogonalization")

    def __init__(self, *, iters: int = 20, top: int = 1, tol: float = 1e-3, samples: int = 0, chunk: int = 0,
                 warm: bool = True, seed: int = 0, **schedule) -> None:
        super().__init__(**schedule)
        if iters < 1 or top < 1 or top > iters:
            raise SpecError(f"{self.name}: need 1 ≤ top ≤ iters, got top={top}, iters={iters}")
        if not 0 <= tol < math.inf:
            raise SpecError(f"{self.name}: tol must be a finite number ≥ 0, got {tol}")
        if samples < 0 or chunk < 0:
            raise SpecError(f"{self.name}: samples and chunk must be ≥ 0 (0: the step's batch / its size)")
        self.iters, self.top, self.tol, self.samples, self.chunk = iters, top, tol, samples, chunk
        self.warm, self.seed = warm, seed
        self._previous: torch.Tensor | None = None
        self._subset: torch.Tensor | None = None

    @property
    def subset(self) -> torch.Tensor | None:
        """Indices of the training examples ``samples=N`` measures on (None before the first measurement)."""
        return self._subset

    def measure(self, ctx: ProbeContext) -> Values:
        threshold, formula, note = stability_threshold(ctx.optimizer, ctx.lr)
        with preserved_state(ctx.model, ctx.optimizer), torch.enable_grad():
            params = trainable(ctx.model)
            matvec, loss, count = self._operator(ctx, params)
            like = params[0].new_empty(sum(p.numel() for p in params))  # the flat vectors' size, dtype, device
            gen = seeded_generator(self.seed, ctx.step, like.device)
            start, warm = flat_start(self._previous if self.warm else None, like, gen, WARM_NOISE)
            result = lanczos(matvec, start, iters=self.iters, top=self.top, tol=self.tol)
        self._previous = result.vector
        eigenvalue = result.eigenvalues[0]
        values: Values = {"eigenvalue": eigenvalue, "threshold": threshold, "relative": eigenvalue / threshold,
                          "threshold_formula": formula, "lr": ctx.lr,
                          "momentum": float(ctx.optimizer.param_groups[0].get("momentum", math.nan)),
                          "loss": float(loss), "samples": count, "iterations": result.iterations,
                          "converged": result.converged, "warm_start": warm}
        if self.top > 1:
            values["eigenvalues"] = result.eigenvalues
        if note:
            values["note"] = note
        return values

    def _operator(self, ctx: ProbeContext, params: list[torch.nn.Parameter]
                  ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, int]:
        """(flat v ↦ Hv, the loss, the number of examples it averages) on the batch or on the fixed subset."""
        if not self.samples:
            loss = batch_loss(ctx)
            hvp = hvp_operator(loss, params)
            return (lambda v: _flat(hvp(_unflat(v, params)))), loss.detach(), len(ctx.targets)
        chunks = self._chunks(ctx)
        rewind = rng_rewinder()

        def matvec(v: torch.Tensor) -> torch.Tensor:
            rewind()  # the same dropout masks / noisy-bn draws at every product: the Hessian of one function
            pieces = _unflat(v, params)
            total = torch.zeros_like(v)
            for x, y in chunks:
                # The subset's loss is the mean over all N examples: chunk c enters with weight n_c / N.
                chunk_loss = loss_on(ctx, x, y) * (len(y) / self.samples)
                total += _flat(hvp_operator(chunk_loss, params)(pieces))
            return total

        rewind()
        with torch.no_grad():
            loss = sum(loss_on(ctx, x, y).detach() * (len(y) / self.samples) for x, y in chunks)
        return matvec, loss, self.samples

    def _chunks(self, ctx: ProbeContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if ctx.train_inputs is None or ctx.train_targets is None:
            raise SpecError(f"{self.name}: samples={self.samples} needs the training data in the probe context "
                            "(ProbeContext.train_inputs/train_targets), which this caller did not pass; "
                            "use samples=0 for the step's batch")
        available = len(ctx.train_targets)
        if self.samples > available:
            raise SpecError(f"{self.name}: samples={self.samples} exceeds the {available} training examples")
        if self._subset is None:  # drawn once per run, so every measurement sees the same examples
            gen = torch.Generator().manual_seed(self.seed)
            self._subset = torch.randperm(available, generator=gen)[:self.samples]
        index = self._subset.to(ctx.train_targets.device)
        # Near-equal chunks of at most ``chunk`` examples: a short last chunk would have noisier batch statistics
        # (and a chunk of one sample breaks batch norm).
        parts = index.tensor_split(math.ceil(self.samples / (self.chunk or len(ctx.targets))))
        return [(ctx.train_inputs[part], ctx.train_targets[part]) for part in parts]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(vector: torch.Tensor, like: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [piece.view(p.shape) for piece, p in zip(vector.split([p.numel() for p in like]), like)]
