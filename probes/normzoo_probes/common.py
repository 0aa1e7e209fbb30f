"""Helpers shared by the probes: which layers to track, losses and gradients on the probe's batch."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from normzoo.errors import SpecError
from normzoo.placement import is_norm
from normzoo.probe import ProbeContext

LAYER_CHOICES = ("weighted", "norm", "conv", "linear", "all")


def tracked_layers(model: nn.Module, layers: str = "weighted") -> list[tuple[str, nn.Module]]:
    """Modules to measure, in forward (registration) order.

    ``weighted``: conv and linear layers (the W_i of Santurkar et al.'s Definition 2.1); ``norm``: normalization
    modules; ``conv`` / ``linear``: only those; ``all``: weighted and norm layers; anything else is a
    '+'-joined list of module names (``features.0+classifier.2``).
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    kinds = {
        "conv": lambda m: isinstance(m, nn.modules.conv._ConvNd),
        "linear": lambda m: isinstance(m, nn.Linear),
        "norm": is_norm,
    }
    kinds["weighted"] = lambda m: kinds["conv"](m) or kinds["linear"](m)
    kinds["all"] = lambda m: kinds["weighted"](m) or is_norm(m)
    if layers in kinds:
        return [(n, m) for n, m in named if kinds[layers](m)]
    wanted = [s for s in layers.split("+") if s]
    by_name = dict(named)
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise SpecError(f"no module named {', '.join(missing)} in the model; layers= takes one of "
                        f"{', '.join(LAYER_CHOICES)} or module names joined by '+'")
    return [(w, by_name[w]) for w in wanted]


def own_params(module: nn.Module) -> list[nn.Parameter]:
    """The module's own trainable parameters (not its children's)."""
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def batch_loss(ctx: ProbeContext) -> torch.Tensor:
    """The training loss on the probe's batch, in the model's current mode (half outputs upcast to float32)."""
    return loss_on(ctx, ctx.inputs, ctx.targets)


def loss_on(ctx: ProbeContext, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss of ``ctx.model`` on any batch, in the model's current mode (half outputs upcast)."""
    out = ctx.model(inputs)
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    return ctx.loss_fn(out, targets)


def gradients(loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    """d loss / d params; parameters the loss does not reach get zeros."""
    grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def flat_norm(tensors: Sequence[torch.Tensor]) -> float:
    """ℓ2 norm of several tensors seen as one vector: per-tensor norms in one fused call (as
    ``clip_grad_norm_`` does), combined in float64."""
    return float(flat_norm_tensor(tensors)) if tensors else 0.0


def flat_norm_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`flat_norm` as a float64 scalar tensor on the tensors' device: no host sync, so a loop can collect
    many and convert them once (:func:`to_floats`)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return torch.linalg.vector_norm(torch.stack([n.double() for n in norms]))


def to_floats(scalars: Sequence[torch.Tensor]) -> list[float]:
    """Scalar tensors as Python floats with one device-to-host transfer per device instead of one per value: on a
    GPU each ``float(t)`` waits for the queue to drain, which costs more than the small kernels themselves. (A few
    values may live on the CPU, e.g. the norm of an empty list, so the values are grouped by device.)"""
    positions: dict[torch.device, list[int]] = {}
    for i, s in enumerate(scalars):
        positions.setdefault(s.device, []).append(i)
    out = [0.0] * len(scalars)
    for where in positions.values():
        values = torch.stack([scalars[i].detach().double().reshape(()) for i in where]).tolist()
        for i, value in zip(where, values):
            out[i] = value
    return out


def clone_all(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies (same strides) made by one fused ``_foreach_copy_`` rather than a clone per tensor."""
    copies = [torch.empty_like(t) for t in tensors]
    if copies:
        torch._foreach_copy_(copies, [t.detach() for t in tensors])
    return copies


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def forward_hooks(modules: Sequence[tuple[str, nn.Module]], hook: Callable[..., object], *,
                  pre: bool = False) -> Iterator[None]:
    """Call ``hook(name, module, args)`` (``pre=True``) or ``hook(name, module, args, output)`` on each module's
    forward while the block runs; a forward hook's non-None return replaces the output, as in torch.

    The hooks are removed on exit even when the forward raises, so a failing probe never leaves the model
    instrumented for the training steps that follow.
    """
    handles = []
    try:
        for name, module in modules:
            bound = functools.partial(hook, name)
            handles.append(module.register_forward_pre_hook(bound) if pre else module.register_forward_hook(bound))
        yield
    finally:
        for handle in handles:
            handle.remove()


def rng_rewinder() -> Callable[[], None]:
    """A function that puts the global RNG back to its state now.

    Called before each loss evaluation so that every point on the line sees the same dropout masks and the same
    injected noise (noisy-bn): the differences then come from θ alone, not from resampled noise.
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def rewind() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return rewind


def seeded_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A private generator for the probe's random vectors, so the global RNG (and thus training) is untouched.

    Seeded from (seed, step): reproducible for a given run, but fresh vectors at each step, so estimation errors
    at different steps are independent rather than one bias repeated along the curve.
    """
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
