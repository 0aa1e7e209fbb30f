"""Noisy BatchNorm (Santurkar et al. 2018, "How Does Batch Normalization Help Optimization?", Algorithm 1).

Batch norm whose output is perturbed, in training mode and freshly at every forward, by channel-wise random
shifts and scales that change from step to step — a deliberate "internal covariate shift". Per forward, for every
channel j::

    µ_j ~ U(−mu, mu)        σ_j ~ U(1, sigma)

and for every element a of channel j (every sample and every spatial position, which counts as batch)::

    m ~ U(µ_j − r_mu, µ_j + r_mu)      s ~ N(σ_j, r_sigma)      a ← s·a + m

Paper constants (the defaults): n_µ = 0.5, n_σ = 1.25, r_µ = r_σ = 0.1.

Choices the paper leaves open, exposed as parameters with these defaults:

* ``where=after``: the noise is applied to the output of the whole BN layer (after γ, β); ``where=before``
  applies it to the normalized activations, before γ, β.
* ``r_sigma`` is the standard deviation of s (not its variance, not a half-width).
* ``eval=mean``: at eval there is no randomness; the activations are scaled by E[s] = (1 + sigma)/2 and shifted
  by E[m] = 0, so the network sees activations of the size it was trained on. ``eval=none`` adds no noise at
  eval (plain BN output), which makes the test accuracy of a noise-trained network collapse (docs/design.md,
  "Noisy BatchNorm").
* ``bn=false``: the same noise on a network without BN: no normalization, no γ/β and no running statistics
  (``eps``, ``affine``, ``momentum`` and ``where`` are then ignored); the layer is not batch-dependent.

Randomness: the draws use torch's global generator of the input's device (``torch.manual_seed`` makes them
reproducible), in this order: µ (C values), σ (C values), the uniforms of m, the normals of s (each of the input's
shape, in (N, C, H, W) order whatever the memory layout, so channels_last inputs get the same noise). Noise is
drawn and applied in float32 for half/bfloat16 inputs (output in the input dtype), else in the input dtype.

Kernels. On CUDA (with Triton) the train-mode layer is one fused custom op (``normzoo.kernels``): batch norm's
statistics pass, then one pass that normalizes and draws m and s per element from Philox, seeded by one
``torch.randint`` from the same generator; the backward regenerates s instead of keeping it, so the layer holds
the memory of ``bn``. The draws are Algorithm 1's distribution but not the same numbers as the eager path's.
``recompute`` gives the eager path (CPU; CUDA without Triton) the same trade: ``recompute=true`` keeps the
generator state instead of s and redraws s in the backward (one activation-sized tensor less per layer, a second
draw of the normals); the default keeps s, the faster choice where drawing dominates, as on CPU.

Data-parallel training (``torch.distributed``, more than one replica): every replica draws the per-element noise of
the whole concatenated batch and keeps the rows of its own samples, so replicas never share noise and a run on N
replicas sees the noise a single process would draw (replicas hold equal shares of the batch, as the runner's are;
the cost is N times the draws). ``sync=true`` also takes the BN statistics over the concatenated batch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normzoo.distributed import global_batch_rows, sync_active
from normzoo.kernels import ops
from normzoo.kernels.tiling import AUX_N
from normzoo.norms.base import NormTraits
from normzoo.norms.batch import BatchNorm
from normzoo.spec import Fraction, NonNegative, Range

_LOW_PRECISION = (torch.float16, torch.bfloat16)
Scale = Annotated[float, Range(1)]  # σ_j ~ U(1, sigma)


class NoisyBatchNorm(BatchNorm):
    """BatchNorm plus Algorithm 1's per-step random channel-wise shift/scale noise (see the module docstring)."""

    traits = NormTraits(batch_dependent=True, running_stats=True, min_values=2)

    def __init__(self, num_features: int, *, mu: NonNegative = 0.5, sigma: Scale = 1.25, r_mu: NonNegative = 0.1,
                 r_sigma: NonNegative = 0.1, where: Literal["after", "before"] = "after",
                 eval: Literal["mean", "none"] = "mean", bn: bool = True, recompute: bool = False,
                 eps: NonNegative = 1e-5, affine: bool = True, momentum: Fraction = 0.1, sync: bool = False,
                 device: Any = None, dtype: Any = None) -> None:
        for name, value in (("mu", mu), ("r_mu", r_mu), ("r_sigma", r_sigma)):
            if not value >= 0:
                raise ValueError(f"noisy-bn: {name} must be >= 0, got {value}")
        if where not in ("after", "before"):
            raise ValueError(f"noisy-bn: where must be 'after' or 'before', got {where!r}")
        if eval not in ("mean", "none"):
            raise ValueError(f"noisy-bn: eval must be 'mean' or 'none', got {eval!r}")
        nn.BatchNorm2d.__init__(self, num_features, eps=eps, momentum=momentum, affine=affine and bn,
                                track_running_stats=bn, device=device, dtype=dtype)
        self.mu, self.sigma, self.r_mu, self.r_sigma = float(mu), float(sigma), float(r_mu), float(r_sigma)
        self.where = where
        self.eval_noise = eval  # not ``self.eval``: that is nn.Module.eval()
        self.bn = bool(bn)
        self.recompute = bool(recompute)
        self.sync = bool(sync)
        if not self.bn:
            self.traits = NormTraits(batch_dependent=False, running_stats=False, min_values=1)

    @property
    def expected_scale(self) -> float:
        """E[s] = E[σ_j] = (1 + sigma)/2, the eval-mode factor of ``eval=mean``."""
        return (1.0 + self.sigma) / 2.0

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.training and ops.kernels_take(x):
            return self._kernel_forward(x)
        if not self.bn:
            a = x
        elif self.where == "after":
            a = super().forward(x)
        else:
            a = self._batch_norm(x, None, None)
        if self.training:
            a = self.add_noise(a)
        elif self.eval_noise == "mean":
            a = a * self.expected_scale
        if self.bn and self.where == "before" and self.affine:
            shape = (1, -1) + (1,) * (a.dim() - 2)
            a = torch.addcmul(self.bias.view(shape), a, self.weight.view(shape)).to(x.dtype)
        return a

    def add_noise(self, a: Tensor) -> Tensor:
        """``s·a + m`` with fresh per-channel µ_j, σ_j and per-element m, s (Algorithm 1)."""
        cdtype = torch.float32 if a.dtype in _LOW_PRECISION else a.dtype
        C = a.shape[1]
        shape = (1, C) + (1,) * (a.dim() - 2)
        kw = {"device": a.device, "dtype": cdtype}
        mu_c = torch.rand(C, **kw).mul_(2 * self.mu).sub_(self.mu).view(shape)
        sigma_c = torch.rand(C, **kw).mul_(self.sigma - 1).add_(1).view(shape)
        # Fewest passes over the (RNG-bound) full-size tensors: draw in place, then one fused multiply-add into m.
        full, rows = global_batch_rows(a.shape)
        if self.recompute and not torch.compiler.is_compiling():
            out = _RedrawnScale.apply(a, mu_c, sigma_c, full, rows, self.r_mu, self.r_sigma)
        else:
            m = torch.empty(full, **kw).uniform_(-self.r_mu, self.r_mu)[rows].add_(mu_c)
            s = torch.empty(full, **kw).normal_(0.0, self.r_sigma)[rows].add_(sigma_c)
            out = m.addcmul_(a, s)
        if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out.to(a.dtype)

    def _kernel_forward(self, x: Tensor) -> Tensor:
        """Train mode through the fused noise kernels (CUDA): see "Kernels" in the module docstring."""
        seed = ops.noise_seed(x.device)
        _, rows = global_batch_rows(x.shape)
        row0 = rows.start or 0
        noise = (self.mu, self.sigma, self.r_mu, self.r_sigma)
        if not self.bn:
            return ops.channel_noise(x, seed, row0, *noise, False)
        synced = sync_active(self.sync)
        out, mean, var, aux = ops.noisy_batch_norm(x, self.weight, self.bias, seed, row0, *noise,
                                                   self.where == "before", self.eps, synced)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            n = aux[AUX_N]  # values per channel (of every replica when synced), on the device
            unbiased = var * (n / (n - 1).clamp_min(1))
            torch._foreach_lerp_((self.running_mean, self.running_var),
                                 (mean.to(self.running_mean.dtype), unbiased.to(self.running_var.dtype)), factor)
        return out

    def _batch_norm(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """``nn.BatchNorm2d.forward`` with the given affine (None: normalization only)."""
        if self.training and sync_active(self.sync):
            return self.synced_batch_norm(x, weight, bias)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                            weight, bias, use_batch, factor, self.eps)

    def extra_repr(self) -> str:
        noise = (f"mu={self.mu}, sigma={self.sigma}, r_mu={self.r_mu}, r_sigma={self.r_sigma}, "
                 f"where={self.where}, eval={self.eval_noise}, bn={self.bn}, recompute={self.recompute}")
        return f"{super().extra_repr()}, {noise}" if self.bn else f"{self.num_features}, {noise}, sync={self.sync}"


class _RedrawnScale(torch.autograd.Function):
    """``m + a·s`` with Algorithm 1's m and s drawn here, as ``add_noise`` draws them; the backward redraws s.

    The generator state the normals were drawn from (a few kilobytes) replaces an activation-sized s in the
    autograd graph; the backward replays the same ``normal_`` call on a generator set to that state.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, mu_c: Tensor, sigma_c: Tensor, full: tuple[int, ...], rows: slice,
                r_mu: float, r_sigma: float) -> Tensor:
        kw = {"dtype": mu_c.dtype, "device": mu_c.device}
        m = torch.empty(full, **kw).uniform_(-r_mu, r_mu)
        # The output is written into m: it must not be a view (an in-place ReLU after a custom Function's view
        # output is an error), so a replica's rows of the global draw are copied out.
        m = (m if rows == slice(None) else m[rows].clone()).add_(mu_c)
        ctx.state = torch.cuda.get_rng_state(a.device) if a.is_cuda else torch.get_rng_state()
        ctx.draw = (full, rows, r_sigma, kw)
        ctx.save_for_backward(sigma_c)
        s = torch.empty(full, **kw).normal_(0.0, r_sigma)[rows].add_(sigma_c)
        return m.addcmul_(a, s)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        (sigma_c,) = ctx.saved_tensors
        full, rows, r_sigma, kw = ctx.draw
        generator = torch.Generator(device=kw["device"])
        generator.set_state(ctx.state)
        s = torch.empty(full, **kw).normal_(0.0, r_sigma, generator=generator)[rows].add_(sigma_c)
        return grad * s, None, None, None, None, None, None
