"""Shared machinery of the batch "scale" norms (ℓp, L1 and top-k batch norms).

Per channel, over the batch and the spatial positions: ``y = γ · (x − µ) / (s + eps) + β`` with µ the batch mean
and s a scale statistic of the batch (a power mean, a mean absolute deviation, a top-k mean, ...). A subclass of
:class:`BatchScaleNorm` says which (a :class:`ScaleSpec`: how s is computed eagerly, as plain autograd ops, and
by the kernels); this module supplies the running statistics, the eval path and the eager implementation: one
custom autograd Function with an analytic backward that needs only a few passes over the tensors. On CUDA, and
under ``torch.compile``, the train-mode forward is the ``normzoo::batch_scale_norm`` custom op instead
(:mod:`normzoo.kernels`), whose CPU implementation is this eager one.

Backward. With g = dL/dout, n the number of values per channel, d = s + eps, y = (x − µ)/d and
G = Σ_i γ g_i y_i (which is γ·dL/dγ), every variant's input gradient is

    dL/dx_j = (γ/d)(g_j − mean g) − (G/d) · ds/dx_j

and only ds/dx differs (see the ``*ScaleGrad`` classes). The two per-channel sums Σg and Σg(x − µ) come from a
single fused pass of ATen's batch-norm backward kernel (asked for the weight and bias gradients only).
Double backward (``create_graph=True``, e.g. Hessian-vector products) differentiates the plain reference instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normzoo import kernels
from normzoo.distributed import ChannelReduce, SyncedChannelReduce, sync_active
from normzoo.kernels import ops
from normzoo.norms.base import NormTraits, as_channels_first_4d
from normzoo.spec import Fraction, NonNegative

_DIMS = (0, 2, 3)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics of half/bfloat16 inputs are computed in float32."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def channel(v: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast against (N, C, H, W)."""
    return v.view(1, -1, 1, 1)


# Inference batch norm computes (t − 0)/sqrt(1 + eps)·scale + shift; torch rejects eps = 0, and 1 + 1e-30 rounds
# to exactly 1 in every floating dtype, so this eps makes it an exact per-channel affine map.
AFFINE_EPS = 1e-30


def affine(t: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``t · scale + shift`` per channel in one pass (ATen's inference batch-norm kernel; keeps t's layout)."""
    ones = torch.ones_like(scale)
    return F.batch_norm(t, torch.zeros_like(scale), ones, scale, shift, False, 0.0, AFFINE_EPS)


def affine_into(out: Tensor, t: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``out ← t · scale + shift`` per channel in one pass; ``out`` is a tensor laid out like t, or t itself.

    On CPU this is the inference batch-norm kernel writing into ``out`` (elementwise, so it may alias t); there,
    ``addcmul`` with a broadcast (1, C, 1, 1) first operand takes a slow path, about 2x this kernel. Elsewhere
    the single ``addcmul`` kernel.
    """
    if t.device.type == "cpu":
        spent = t.new_empty(0)  # the batch statistics outputs, unused in inference mode
        torch.ops.aten.native_batch_norm.out(t, scale, shift, torch.zeros_like(scale), torch.ones_like(scale), False,
                                             0.0, AFFINE_EPS, out=out, save_mean=spent, save_invstd=spent.clone())
        return out
    return torch.addcmul(channel(shift), t, channel(scale), out=out)


def affine_(t: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``t ← t · scale + shift`` per channel, in place, in one pass."""
    return affine_into(t, t, scale, shift)


def channel_sum(t: Tensor) -> Tensor:
    """Per-channel sum of (N, C, H, W). On CPU over H, W, then over N: ATen's CPU reduction over (0, 2, 3) at
    once is slower (up to 1.5x on small H·W); elsewhere one reduction kernel."""
    return t.sum((2, 3)).sum(0) if t.device.type == "cpu" else t.sum(_DIMS)


def channel_grad_sums(g: Tensor, x: Tensor, mean: Tensor, inv: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel ``Σ g`` and ``Σ g·(x − mean)·inv`` in one fused pass over g and x."""
    try:
        # A weight of ones: without one the CUDA kernel returns an empty weight gradient.
        _, sum_gy, sum_g = torch.ops.aten.native_batch_norm_backward(
            g, x, torch.ones_like(mean), None, None, mean, inv, True, 0.0, [False, True, True])
        return sum_g, sum_gy
    except (RuntimeError, NotImplementedError):  # a backend without the fused kernel
        return g.sum(_DIMS), (g * (x - channel(mean))).sum(_DIMS) * inv


# -- how the scale s depends on x ------------------------------------------------------------------------------------
class ScaleGrad:
    """ds/dx of one scale statistic; builds ``dx = g·A + C0 + K·ds/dx`` (A, C0, K per channel)."""

    def input_grad(self, g: Tensor, x: Tensor, mean: Tensor, A: Tensor, C0: Tensor, K: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass
class LinearScaleGrad(ScaleGrad):
    """ds/dx_j = alpha · (x_j − center): s = factor · sqrt(mean z²) (z = x − center, alpha = factor²/(n s))."""

    alpha: Tensor
    center: Tensor | None  # None: 0 (uncentered)

    def input_grad(self, g, x, mean, A, C0, K):
        k = K * self.alpha
        shift = C0 if self.center is None else C0 - k * self.center
        dx = affine(g, A, shift)
        return dx.addcmul_(x, channel(k))


@dataclass
class SignScaleGrad(ScaleGrad):
    """ds/dx_j = beta · (sign(z_j) − [centered] mean sign(z)): s = factor · mean |z| (beta = factor/n)."""

    beta: Tensor | float
    centered: bool

    def input_grad(self, g, x, mean, A, C0, K):
        t = torch.sub(x, channel(mean)).sign_() if self.centered else torch.sign(x)
        return _dense_with(t, g, A, C0, K * self.beta, self.centered)


@dataclass
class PowerScaleGrad(ScaleGrad):
    """ds/dx_j = kappa · (w_j − [centered] mean w) with w = sign(z)|z|^(p−1): s = factor · M_p(z)."""

    kappa: Tensor
    p: float
    centered: bool

    def input_grad(self, g, x, mean, A, C0, K):
        z = torch.sub(x, channel(mean)) if self.centered else x
        t = z.abs().pow_(self.p - 1).copysign_(z)  # sign(z)|z|^(p−1): 0 at z = ±0 as p > 1
        return _dense_with(t, g, A, C0, K * self.kappa, self.centered)


def _dense_with(t: Tensor, g: Tensor, A: Tensor, C0: Tensor, k: Tensor, centered: bool) -> Tensor:
    """``g·A + C0 + k·(t − [centered] mean t)``, reusing the freshly allocated t as the result."""
    shift = C0 - k * channel_sum(t) * (t.shape[1] / t.numel()) if centered else C0
    return affine_(t, k, shift).addcmul_(g, channel(A))


@dataclass
class SparseScaleGrad(ScaleGrad):
    """ds/dz is ``coef`` at a few positions per channel (max, top-k); centered subtracts its mean over the channel.

    ``n_idx``/``hw_idx`` (C, k) locate the positions as sample and flattened spatial index.
    """

    n_idx: Tensor
    hw_idx: Tensor
    coef: Tensor
    centered: bool

    def input_grad(self, g, x, mean, A, C0, K):
        n = x.numel() // x.shape[1]
        shift = C0 - K * self.coef.sum(1) / n if self.centered else C0
        dx = affine(g, A, shift)
        C, k = self.coef.shape
        width = x.shape[3]
        c_idx = torch.arange(C, device=x.device).unsqueeze(1)
        values = (K.unsqueeze(1) * self.coef).to(dx.dtype).reshape(-1)
        if dx.is_contiguous() or dx.is_contiguous(memory_format=torch.channels_last):
            # index_add_ into the dense storage: index_put_(accumulate=True) synchronizes with the GPU every call.
            sn, sc, sh, sw = dx.stride()
            if x.shape[2] == 1 or sh == width * sw:  # H and W flatten to one spatial index (both layouts)
                spatial = self.hw_idx * sw
            else:  # a size-1 dimension with an arbitrary stride
                spatial = self.hw_idx // width * sh + self.hw_idx % width * sw
            offset = (self.n_idx * sn + spatial).add_(c_idx * sc)
            dx.as_strided((dx.numel(),), (1,)).index_add_(0, offset.reshape(-1), values)
        else:
            index = (self.n_idx, c_idx.expand(C, k), self.hw_idx // width, self.hw_idx % width)
            dx.index_put_(tuple(i.reshape(-1) for i in index), values, accumulate=True)
        return dx


@dataclass
class ScaleStats:
    """What ``_batch_stats`` returns: batch mean and scale per channel (compute dtype) and how s depends on x.

    ``work``, when given, is a fresh tensor holding ``x − mean``; the forward overwrites it with the output.
    ``scratch``, when given (and no ``work``), is a fresh tensor shaped like x in the compute dtype whose contents
    are spent; the forward writes the output into it instead of allocating one.
    """

    mean: Tensor
    scale: Tensor
    grad: ScaleGrad
    work: Tensor | None = None
    scratch: Tensor | None = None


# -- what a norm divides by -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleSpec:
    """The scale statistic of a batch scale norm: what the eager code, the reference and the kernels compute.

    ``kind="power"``: ``factor · M_p(z)`` with z = x − µ (``centered``) or x; ``kind="topk"``: the mean of the k
    largest |x − µ| (k capped at the values per channel).
    """

    kind: str
    p: float = 2.0
    centered: bool = False
    factor: float = 1.0
    k: int = 1

    def stats(self, x: Tensor) -> ScaleStats:
        """Batch mean, scale and ds/dx of a (N, C, H, W) tensor in the compute dtype (no autograd)."""
        if self.kind == "topk":
            from normzoo.norms.hoffer import topk_stats

            return topk_stats(x, self.k)
        from normzoo.norms.lp import power_mean_stats

        return power_mean_stats(x, self.p, self.centered, self.factor)

    def reference_scale(self, x: Tensor, mean: Tensor, reduce: ChannelReduce) -> Tensor:
        """The scale as plain differentiable ops: x (N, C, H, W), mean (1, C, 1, 1) -> (1, C, 1, 1).

        Per-channel reductions go through ``reduce``, so the same code computes the replica-synced statistics.
        """
        if self.kind == "topk":
            return reduce.topk_mean((x - mean).abs(), self.k)
        from normzoo.norms.lp import reference_power_mean

        return self.factor * reference_power_mean(x - mean if self.centered else x, self.p, reduce)

    def op_args(self) -> tuple[str, float, bool, float, int]:
        """The scale's arguments of the ``normzoo::batch_scale_norm`` custom op."""
        return self.kind, self.p, self.centered, self.factor, self.k


# -- the eager implementation ----------------------------------------------------------------------------------------
def scale_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: ScaleSpec,
                       eps: float) -> tuple[Tensor, ScaleStats, Tensor]:
    """Train-mode output in a few fused passes, the batch statistics, and d = s + eps (for the backward)."""
    cdtype = compute_dtype(x.dtype)
    x4 = as_channels_first_4d(x).to(cdtype)
    stats = spec.stats(x4)
    d = stats.scale + eps
    A = d.reciprocal() if weight is None else weight.to(cdtype) / d
    beta = torch.zeros_like(d) if bias is None else bias.to(cdtype)
    if stats.work is not None:  # x − µ is already materialized: scale and shift it in place
        out = affine_(stats.work, A, beta)
    elif stats.scratch is not None:
        out = affine_into(stats.scratch, x4, A, beta - stats.mean * A)
    else:
        out = affine(x4, A, beta - stats.mean * A)
    out = out.to(x.dtype)
    if out.shape != x.shape:  # (N, C) input; a view must not leave a custom Function (in-place ReLU after it)
        out = out.reshape(x.shape).clone()
    return out, stats, d


def scale_norm_backward(grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, d: Tensor,
                        scale_grad: ScaleGrad, input_grad: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
    """dL/dx (None unless ``input_grad``), and dL/dγ, dL/dβ per channel in the compute dtype."""
    cdtype = compute_dtype(x.dtype)
    x4 = as_channels_first_4d(x).to(cdtype)
    g4 = as_channels_first_4d(grad_out).to(cdtype)
    n = x4.numel() // x4.shape[1]
    inv = d.reciprocal()
    sum_g, sum_gy = channel_grad_sums(g4, x4, mean, inv)  # Σg and Σ g·y = dL/dγ
    dx = None
    if input_grad:
        gamma = None if weight is None else weight.to(cdtype)
        A = inv if gamma is None else gamma * inv
        C0 = -A * sum_g / n
        K = -(sum_gy if gamma is None else gamma * sum_gy) * inv  # −G/d
        dx = scale_grad.input_grad(g4, x4, mean, A, C0, K).to(x.dtype).reshape(x.shape)
    return dx, sum_gy, sum_g


class _BatchScaleNormFn(torch.autograd.Function):
    """The eager train-mode forward with an analytic backward that saves only x and per-channel statistics."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: ScaleSpec, eps: float):
        out, stats, d = scale_norm_forward(x, weight, bias, spec, eps)
        ctx.save_for_backward(x, weight, bias, stats.mean, d)
        ctx.scale_grad = stats.grad
        ctx.spec, ctx.eps = spec, eps
        ctx.mark_non_differentiable(stats.mean, stats.scale)
        ctx.set_materialize_grads(False)  # no zero tensors for the gradients of mean and scale (never used)
        return out, stats.mean, stats.scale

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_mean: Any, _grad_scale: Any):
        if grad_out is None:  # not materialized: no gradient reached the output
            return None, None, None, None, None
        x, weight, bias, mean, d = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain reference instead
            return reference_grads(x, weight, bias, grad_out, ctx.spec, ctx.eps) + (None, None)
        dx, sum_gy, sum_g = scale_norm_backward(grad_out, x, weight, mean, d, ctx.scale_grad,
                                                ctx.needs_input_grad[0])
        dw = sum_gy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_g.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


# -- the plain-autograd reference ------------------------------------------------------------------------------------
def reference_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: ScaleSpec, eps: float,
                      reduce: ChannelReduce | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Output, batch mean and batch scale in plain autograd ops, with the statistics taken by ``reduce``."""
    reduce = reduce or ChannelReduce()
    cdtype = compute_dtype(x.dtype)
    x4 = as_channels_first_4d(x).to(cdtype)
    mean = reduce.mean(x4)
    scale = spec.reference_scale(x4, mean, reduce)
    y = (x4 - mean) / (scale + eps)
    if weight is not None:
        y = y * channel(weight.to(cdtype))
    if bias is not None:
        y = y + channel(bias.to(cdtype))
    return y.to(x.dtype).reshape(x.shape), mean, scale


def reference_grads(x: Tensor, weight: Tensor | None, bias: Tensor | None, grad_out: Tensor, spec: ScaleSpec,
                    eps: float, reduce: ChannelReduce | None = None) -> tuple[Tensor | None, ...]:
    """(dx, dγ, dβ) of the reference, differentiable themselves (double backward, e.g. Hessian-vector products)."""
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    with torch.enable_grad():
        out = reference_forward(x, weight, bias, spec, eps, reduce)[0]
        grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in (x, weight, bias))


# -- the module ------------------------------------------------------------------------------------------------------
class BatchScaleNorm(nn.Module):
    """Base of the batch scale norms: parameters, running estimates, train/eval forward.

    Train mode normalizes with the batch mean and scale and updates ``running_mean``/``running_scale`` by an
    exponential moving average (``r ← (1 − momentum)·r + momentum·batch``; the scale gets no Bessel correction);
    eval mode uses the running estimates: ``y = γ (x − running_mean)/(running_scale + eps) + β``.

    A subclass sets ``self.scale_spec`` (a :class:`ScaleSpec`) in its constructor. The train-mode forward goes
    through the ``normzoo::batch_scale_norm`` custom op on CUDA (fused Triton kernels) and whenever
    ``torch.compile`` traces it (one graph node, no graph break); in eager mode on CPU it calls the eager
    implementation directly.
    """

    traits = NormTraits(batch_dependent=True, running_stats=True, min_values=2)
    scale_spec: ScaleSpec

    def __init__(self, num_features: int, *, eps: NonNegative = 1e-5, affine: bool = True, momentum: Fraction = 0.1,
                 sync: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be positive, got {num_features}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1], got {momentum}")
        if not eps >= 0.0:
            raise ValueError(f"{type(self).__name__}: eps must be >= 0, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.affine = affine
        self.momentum = float(momentum)
        self.sync = bool(sync)
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_scale", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()

    # -- parameters and running statistics -----------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_scale.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        sync = ", sync=True" if self.sync else ""
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, momentum={self.momentum}{sync}"

    # -- forward ---------------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"{type(self).__name__} expects (N, C) or (N, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got {x.shape[1]} channels")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training:
            return self.eval_forward(x)
        synced = sync_active(self.sync)
        if kernels.use_triton(x) or torch.compiler.is_compiling():
            out, mean, scale, _ = ops.batch_scale_norm(x, self.weight, self.bias, *self.scale_spec.op_args(),
                                                       self.eps, synced)
        elif synced:  # statistics of every replica's batch: plain ops around differentiable gathers
            out, mean, scale = reference_forward(x, self.weight, self.bias, self.scale_spec, self.eps,
                                                 SyncedChannelReduce())
            mean, scale = mean.detach().flatten(), scale.detach().flatten()
        else:
            out, mean, scale = _BatchScaleNormFn.apply(x, self.weight, self.bias, self.scale_spec, self.eps)
        with torch.no_grad():  # on the device, no host sync: one foreach kernel for both buffers on CUDA
            torch._foreach_lerp_((self.running_mean, self.running_scale),
                                 (mean.to(self.running_mean.dtype), scale.to(self.running_scale.dtype)),
                                 self.momentum)
            self.num_batches_tracked.add_(1)
        return out

    def eval_forward(self, x: Tensor) -> Tensor:
        """``γ (x − running_mean)/(running_scale + eps) + β`` in one pass (differentiable)."""
        cdtype = compute_dtype(x.dtype)
        a = (self.running_scale.to(cdtype) + self.eps).reciprocal()
        if self.weight is not None:
            a = self.weight.to(cdtype) * a
        b = -self.running_mean.to(cdtype) * a
        if self.bias is not None:
            b = b + self.bias.to(cdtype)
        return F.batch_norm(x, torch.zeros_like(a), torch.ones_like(a), a, b, False, 0.0, AFFINE_EPS)

    def reference_forward(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """The train-mode output written with plain autograd ops (tests, double backward); no running update."""
        return reference_forward(x, weight, bias, self.scale_spec, self.eps)[0]


def nan_free_reciprocal(s: Tensor, numerator: float) -> Tensor:
    """``numerator / s`` where s > 0, else 0 (a constant channel's scale has no useful derivative)."""
    return torch.where(s > 0, numerator / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))


SQRT_HALF_PI = math.sqrt(math.pi / 2)
