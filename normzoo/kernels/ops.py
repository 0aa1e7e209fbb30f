"""The custom ops through which the zoo's batch norms reach their kernels.

``torch.compile`` traces each op as one graph node (``register_fake`` gives its output shapes), so a model full of
ℓp or noisy norms compiles into one graph, and CUDA graphs capture the kernels (no host sync, no CPU tensor):

* ``normzoo::batch_scale_norm(x, weight?, bias?, kind, p, centered, factor, k, eps, sync)``
  → (out, mean, scale, aux): the train-mode forward of ``lp``, ``l1-bn``, ``topk-bn`` (``normzoo.norms._scale``);
* ``normzoo::noisy_batch_norm(x, weight?, bias?, seed, row0, mu, sigma, r_mu, r_sigma, before, eps, sync)``
  → (out, mean, var, aux): batch norm with Algorithm 1's noise fused in (``noisy-bn``);
* ``normzoo::channel_noise(a, seed, row0, mu, sigma, r_mu, r_sigma, scale_only)`` → ``s·a + m`` (``s·a``):
  the noise alone (``noisy-bn:bn=false``); its backward is the same op with ``scale_only``.

Each has a backward op of its own, registered with ``register_autograd``; when the backward itself must be
differentiable (``create_graph=True``: Hessian-vector products) it differentiates a plain-autograd reference
instead, as the eager implementation does. ``sync=true`` reduces the statistics across data-parallel replicas
(one all-gather of a few per-channel rows per statistics pass) before the normalize pass.

Dispatch: the Triton kernels when :func:`normzoo.kernels.use_triton` says so (CUDA with Triton), else the eager
implementation (CPU, and anything else), which makes ``normzoo::batch_scale_norm`` traceable everywhere. The
noise ops exist only as kernels: the norms call them only when :func:`~normzoo.kernels.use_triton` holds.
Importing this module registers the ops; it does not import Triton.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from normzoo.kernels import use_triton
from normzoo.kernels.tiling import AUX_ROWS, mergeable

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED_HIGH = 1 << 62


def noise_seed(device: torch.device) -> Tensor:
    """One Philox seed for the noise kernels from torch's generator of ``device`` (a 1-element int64 tensor there).

    One ``torch.randint`` per noisy forward is the whole of the noise's use of torch's generator, so
    ``torch.manual_seed`` and saved RNG states reproduce the noise, and CUDA graphs advance it on every replay.
    """
    return torch.randint(SEED_HIGH, (1,), device=device, dtype=torch.int64)


def kernels_take(x: Tensor) -> bool:
    """Whether the Triton kernels handle ``x``: a float32/bfloat16/float16 (N, C) or (N, C, H, W) tensor whose H and
    W merge into one stride (NCHW, channels_last), with 32-bit offsets, on a device they run on."""
    return (use_triton(x) and x.dtype in _KERNEL_DTYPES and x.dim() in (2, 4) and x.numel() < 2**31
            and mergeable(x))


def _kernels_for(x: Tensor, kind: str, sync: bool) -> bool:
    """Whether the scale norm's kernels run on ``x`` (synced top-k takes the eager path: its exact selection across
    replicas would need every replica's candidates, not a few per-channel sums)."""
    return kernels_take(x) and not (sync and kind == "topk")


def _gather_replicas(local: Tensor) -> Tensor:
    """Every replica's partial rows, concatenated along dim 0 (one all-gather; same shape on every replica)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def _aux_like(x: Tensor, fake: bool = False) -> Tensor:
    """What the backward needs besides mean and scale (kernels only; zeros from the eager implementation)."""
    make = x.new_empty if fake else x.new_zeros
    return make(AUX_ROWS, x.shape[1], dtype=torch.float32)


# -- the batch scale norms -------------------------------------------------------------------------------------------
@torch.library.custom_op("normzoo::batch_scale_norm", mutates_args=())
def batch_scale_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, kind: str, p: float, centered: bool,
                     factor: float, k: int, eps: float, sync: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train-mode forward of a batch scale norm: output, batch mean, batch scale, what the backward needs."""
    if _kernels_for(x, kind, sync):
        from normzoo.kernels import scale_norm

        scale = scale_norm.Scale.of(kind, p, centered, factor, k)
        return scale_norm.forward(x, weight, bias, scale, eps, gather=_gather_replicas if sync else None)
    from normzoo.norms import _scale

    spec = _scale.ScaleSpec(kind, p, centered, factor, k)
    if sync:  # the plain ops around differentiable gathers, as in eager mode
        out, mean, scale = _scale.reference_forward(x, weight, bias, spec, eps, _synced())
        mean, scale = mean.flatten(), scale.flatten()
    else:
        out, stats, _ = _scale.scale_norm_forward(x, weight, bias, spec, eps)
        mean, scale = stats.mean, stats.scale
    return out, mean, scale, _aux_like(x)


@batch_scale_norm.register_fake
def _(x, weight, bias, kind, p, centered, factor, k, eps, sync):
    stat_dtype = torch.float32 if kernels_take(x) else _compute_dtype(x.dtype)
    C = x.shape[1]
    return (torch.empty_like(x), x.new_empty(C, dtype=stat_dtype), x.new_empty(C, dtype=stat_dtype),
            _aux_like(x, fake=True))


@torch.library.custom_op("normzoo::batch_scale_norm_backward", mutates_args=())
def batch_scale_norm_backward(grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, scale: Tensor,
                              aux: Tensor, kind: str, p: float, centered: bool, factor: float, k: int, eps: float,
                              sync: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dL/dx, and dL/dγ, dL/dβ per channel (float32 or the compute dtype). Not synced: the autograd formula
    differentiates the reference for synced statistics outside the kernels."""
    if _kernels_for(x, kind, sync):
        from normzoo.kernels import scale_norm

        scale_ = scale_norm.Scale.of(kind, p, centered, factor, k)
        return scale_norm.backward(grad, x, weight, mean, scale, aux, scale_, eps,
                                   gather=_gather_replicas if sync else None)
    from normzoo.norms import _scale

    spec = _scale.ScaleSpec(kind, p, centered, factor, k)
    cdtype = _compute_dtype(x.dtype)
    x4 = x if x.dim() == 4 else x[:, :, None, None]
    stats = spec.stats(x4.to(cdtype))  # the eager backward needs ds/dx: recomputed (compiled CPU runs only)
    dx, sum_gy, sum_g = _scale.scale_norm_backward(grad, x, weight, mean, scale + eps, stats.grad)
    return dx, sum_gy, sum_g


@batch_scale_norm_backward.register_fake
def _(grad, x, weight, mean, scale, aux, kind, p, centered, factor, k, eps, sync):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


def _scale_setup(ctx, inputs, output) -> None:
    x, weight, bias, *args = inputs
    _, mean, scale, aux = output
    ctx.save_for_backward(x, weight, bias, mean, scale, aux)
    ctx.args = args  # kind, p, centered, factor, k, eps, sync


def _scale_backward(ctx, grad_out, _mean, _scale, _aux):
    x, weight, bias, mean, scale, aux = ctx.saved_tensors
    kind, p, centered, factor, k, eps, sync = ctx.args
    # create_graph=True (double backward), or synced statistics outside the kernels: differentiate the plain
    # reference (with its differentiable gathers), at the autograd level where it records a graph.
    if torch.is_grad_enabled() or (sync and not _kernels_for(x, kind, sync)):
        from normzoo.norms import _scale

        spec = _scale.ScaleSpec(kind, p, centered, factor, k)
        grads = _reference_grads(x, weight, bias, grad_out, spec, eps, _synced() if sync else None)
    else:
        grads = batch_scale_norm_backward(grad_out, x, weight, mean, scale, aux, *ctx.args)
    return _input_grads(grads, ctx, x, weight, bias) + (None,) * 7


batch_scale_norm.register_autograd(_scale_backward, setup_context=_scale_setup)


# -- noisy batch norm -----------------------------------------------------------------------------------------------
@torch.library.custom_op("normzoo::noisy_batch_norm", mutates_args=())
def noisy_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, seed: Tensor, row0: int, mu: float,
                     sigma: float, r_mu: float, r_sigma: float, before: bool, eps: float,
                     sync: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train-mode batch norm with Algorithm 1's noise: output, batch mean, biased batch variance, aux."""
    from normzoo.kernels import scale_norm

    noise = _noise(seed, row0, mu, sigma, r_mu, r_sigma, before)
    return scale_norm.forward(x, weight, bias, scale_norm.Scale.of("bn", 2.0, True, 1.0, 1), eps,
                              gather=_gather_replicas if sync else None, noise=noise)


@noisy_batch_norm.register_fake
def _(x, weight, bias, seed, row0, mu, sigma, r_mu, r_sigma, before, eps, sync):
    C = x.shape[1]
    return (torch.empty_like(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32),
            _aux_like(x, fake=True))


@torch.library.custom_op("normzoo::noisy_batch_norm_backward", mutates_args=())
def noisy_batch_norm_backward(grad: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor,
                              aux: Tensor, seed: Tensor, row0: int, mu: float, sigma: float, r_mu: float,
                              r_sigma: float, before: bool, eps: float, sync: bool) -> tuple[Tensor, Tensor, Tensor]:
    from normzoo.kernels import scale_norm

    noise = _noise(seed, row0, mu, sigma, r_mu, r_sigma, before)
    return scale_norm.backward(grad, x, weight, mean, var, aux,
                               scale_norm.Scale.of("bn", 2.0, True, 1.0, 1), eps,
                               gather=_gather_replicas if sync else None, noise=noise)


@noisy_batch_norm_backward.register_fake
def _(grad, x, weight, mean, var, aux, seed, row0, mu, sigma, r_mu, r_sigma, before, eps, sync):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


def _noisy_setup(ctx, inputs, output) -> None:
    x, weight, bias, seed, *args = inputs
    _, mean, var, aux = output
    ctx.save_for_backward(x, weight, bias, mean, var, aux, seed)
    ctx.args = args  # row0, mu, sigma, r_mu, r_sigma, before, eps, sync


def _noisy_backward(ctx, grad_out, _mean, _var, _aux):
    x, weight, bias, mean, var, aux, seed = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the same noise, batch norm in plain autograd ops
        grads = _noisy_reference_grads(x, weight, bias, seed, grad_out, *ctx.args)
    else:
        grads = noisy_batch_norm_backward(grad_out, x, weight, mean, var, aux, seed, *ctx.args)
    return _input_grads(grads, ctx, x, weight, bias) + (None,) * 9


noisy_batch_norm.register_autograd(_noisy_backward, setup_context=_noisy_setup)


@torch.library.custom_op("normzoo::channel_noise", mutates_args=())
def channel_noise(a: Tensor, seed: Tensor, row0: int, mu: float, sigma: float, r_mu: float, r_sigma: float,
                  scale_only: bool) -> Tensor:
    """``s·a + m`` with Algorithm 1's per-element noise (``scale_only``: ``s·a``, the backward)."""
    from normzoo.kernels.noise import channel_noise as launch

    return launch(a, seed, row0, mu, sigma, r_mu, r_sigma, backward=scale_only)


@channel_noise.register_fake
def _(a, seed, row0, mu, sigma, r_mu, r_sigma, scale_only):
    return torch.empty_like(a)


def _noise_setup(ctx, inputs, output) -> None:
    _, seed, *args = inputs
    ctx.save_for_backward(seed)
    ctx.args = args[:-1]  # row0, mu, sigma, r_mu, r_sigma


def _noise_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return (channel_noise(grad, seed, *ctx.args, True),) + (None,) * 7  # s·g, itself differentiable


channel_noise.register_autograd(_noise_backward, setup_context=_noise_setup)


# -- helpers ---------------------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _synced():
    from normzoo.distributed import SyncedChannelReduce

    return SyncedChannelReduce()


def _noise(seed: Tensor, row0: int, mu: float, sigma: float, r_mu: float, r_sigma: float, before: bool):
    from normzoo.kernels.scale_norm import Noise

    return Noise(seed, row0, mu, sigma, r_mu, r_sigma, before)


def _reference_grads(x, weight, bias, grad_out, spec, eps, reduce) -> tuple:
    from normzoo.norms._scale import reference_grads

    return reference_grads(x, weight, bias, grad_out, spec, eps, reduce)


def _input_grads(grads: tuple, ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple:
    """(dx, dγ, dβ) as autograd wants them: None where not needed, parameter dtypes."""
    dx, dw, db = grads
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None,
            dw.to(weight.dtype) if weight is not None and needs[1] and dw is not None else None,
            db.to(bias.dtype) if bias is not None and needs[2] and db is not None else None)


def _noisy_reference_grads(x, weight, bias, seed, grad_out, row0, mu, sigma, r_mu, r_sigma, before, eps, sync):
    """Gradients of batch norm + the kernels' noise (the same draws) in plain autograd ops, differentiable."""
    from normzoo.distributed import ChannelReduce
    from normzoo.kernels.noise import channel_noise as launch

    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    with torch.enable_grad():
        x4 = (x if x.dim() == 4 else x[:, :, None, None]).float()
        _, m, s = launch(x.detach(), seed, row0, mu, sigma, r_mu, r_sigma, draws=True)
        m, s = (m, s) if x.dim() == 4 else (m[:, :, None, None], s[:, :, None, None])
        reduce = _synced() if sync else ChannelReduce()
        mean = reduce.mean(x4)
        xhat = (x4 - mean) * torch.rsqrt(reduce.mean((x4 - mean).square()) + eps)
        shape = (1, -1, 1, 1)
        gamma = weight.float().view(shape) if weight is not None else 1.0
        beta = bias.float().view(shape) if bias is not None else 0.0
        out = gamma * (s * xhat + m) + beta if before else s * (gamma * xhat + beta) + m
        grads = iter(torch.autograd.grad(out.to(x.dtype).reshape(x.shape), inputs, grad_out, create_graph=True,
                                         allow_unused=True))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in (x, weight, bias))
