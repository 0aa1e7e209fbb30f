"""Curvature of the training loss: dominant Hessian eigenvalue (power iteration) and trace (Hutchinson).

Both only need Hessian-vector products Hv = ∇(∇L·v), one double backward each, as in PyHessian (Yao et al.
2020); the Hessian itself is never formed. Works with every norm in train mode: normzoo's custom-autograd norms
differentiate a plain reference implementation when a graph is being built (``create_graph=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from normzoo.errors import SpecError
from normzoo.probe import Probe, ProbeContext, Values, preserved_state
from normzoo_probes.common import batch_loss, gradients, seeded_generator, trainable

Vectors = list[torch.Tensor]


def hvp_operator(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> Callable[[Vectors], Vectors]:
    """v ↦ Hv for the Hessian of ``loss`` w.r.t. ``params``, reusing one first-order graph for every product."""
    grads = gradients(loss, params, create_graph=True)
    # A gradient without a graph does not depend on θ (e.g. an unused parameter's zeros): its Hessian rows are 0.
    live = [i for i, g in enumerate(grads) if g.requires_grad]

    def hvp(v: Vectors) -> Vectors:
        if not live:
            return [torch.zeros_like(p) for p in params]
        rows = torch.autograd.grad([grads[i] for i in live], list(params), grad_outputs=[v[i] for i in live],
                                   retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(rows, params)]

    return hvp


def dot(a: Vectors, b: Vectors) -> float:
    """⟨a, b⟩ of parameter-shaped lists, accumulated in float64."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def power_iteration(hvp: Callable[[Vectors], Vectors], v: Vectors, iters: int,
                    tol: float) -> tuple[float, int, bool]:
    """The eigenvalue of largest magnitude (with its sign) from start vector ``v``.

    Returns (Rayleigh quotient vᵀHv of the last unit iterate, products used, converged). Converged means the
    relative change of the estimate fell to ``tol``; power iteration converges slowly, or not at all, when the
    two largest |λ| are close (e.g. λ and −λ), which the flag then reports.
    """
    norm = math.sqrt(dot(v, v))
    v = [x / norm for x in v]
    eigenvalue = math.nan
    for i in range(1, iters + 1):
        hv = hvp(v)
        previous, eigenvalue = eigenvalue, dot(v, hv)
        length = math.sqrt(dot(hv, hv))
        if length == 0.0:  # v in the null space: Hv = 0, and 0 is an eigenvalue we cannot improve on
            return 0.0, i, True
        if abs(eigenvalue - previous) <= tol * abs(eigenvalue):
            return eigenvalue, i, True
        v = [x / length for x in hv]
    return eigenvalue, iters, False


def hutchinson_trace(hvp: Callable[[Vectors], Vectors], like: Vectors, samples: int,
                     gen: torch.Generator) -> tuple[float, float]:
    """(mean of zᵀHz over Rademacher z, its standard error): E[zᵀHz] = tr(H) since E[zzᵀ] = I."""
    estimates = []
    for _ in range(samples):
        z = [torch.randint(0, 2, t.shape, generator=gen, device=t.device).to(t.dtype).mul_(2).sub_(1)
             for t in like]
        estimates.append(dot(z, hvp(z)))
    mean = sum(estimates) / samples
    if samples < 2:
        return mean, math.nan
    variance = sum((e - mean) ** 2 for e in estimates) / (samples - 1)
    return mean, math.sqrt(variance / samples)


class HessianProbe(Probe):
    """Dominant eigenvalue and trace of the Hessian of the batch loss, from Hessian-vector products.

    ``eigenvalue`` is the eigenvalue of largest magnitude, signed (power iteration cannot single out the largest
    algebraic one; near a minimum, and usually in training, the two coincide). Costs one forward+backward with
    graph plus ``iters`` + ``trace_samples`` double backwards; ``trace_samples=0`` skips the trace.
    """

    name = "hessian"
    report = "normzoo_probes.reports.hessian:HessianReport"
    summary = "top Hessian eigenvalue (power iteration) and trace (Hutchinson) of the batch loss"
    reference = ("Yao et al. 2020, PyHessian: Neural Networks Through the Lens of the Hessian; "
                 "Hutchinson 1989 (trace estimator)")

    def __init__(self, *, iters: int = 20, tol: float = 1e-3, trace_samples: int = 10, seed: int = 0,
                 **schedule) -> None:
        super().__init__(**schedule)
        if iters < 1:
            raise SpecError(f"{self.name}: iters must be ≥ 1, got {iters}")
        if not 0 <= tol < math.inf:
            raise SpecError(f"{self.name}: tol must be a finite number ≥ 0, got {tol}")
        if trace_samples < 0:
            raise SpecError(f"{self.name}: trace_samples must be ≥ 0 (0 skips the trace), got {trace_samples}")
        self.iters, self.tol, self.trace_samples, self.seed = iters, tol, trace_samples, seed

    def measure(self, ctx: ProbeContext) -> Values:
        with preserved_state(ctx.model, ctx.optimizer):
            params = trainable(ctx.model)
            loss = batch_loss(ctx)
            hvp = hvp_operator(loss, params)
            gen = seeded_generator(self.seed, ctx.step, params[0].device)
            start = [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in params]
            eigenvalue, used, converged = power_iteration(hvp, start, self.iters, self.tol)
            trace, trace_stderr = (hutchinson_trace(hvp, params, self.trace_samples, gen) if self.trace_samples
                                   else (None, None))
        return {"loss": float(loss.detach()), "eigenvalue": eigenvalue, "iterations": used,
                "converged": converged, "trace": trace, "trace_stderr": trace_stderr}
