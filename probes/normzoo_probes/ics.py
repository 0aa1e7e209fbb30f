"""Internal covariate shift as Santurkar et al. define it (2018, Definition 2.1).

ICS of layer i at step t compares two gradients of the loss on step t's batch with respect to the layer's own
parameters W_i: G_i at the current parameters, and G'_i with the layers *before* i moved to where this step's
optimizer update takes them (layers i..k unchanged). ‖G_i − G'_i‖₂ measures how much the update of the earlier
layers — the shift of layer i's input distribution — changes what layer i should do.

Choices the paper leaves open, fixed here and documented:

- The update is the real optimizer's: ``ctx.optimizer.step()`` runs on the batch's gradient (momentum buffer,
  weight decay, the learning rate already in its param groups — the runner sets it before probing), inside
  :func:`preserved_state`, which puts parameters, gradients and optimizer state back afterwards.
- "Layers before i" are the parameters layer i's input depends on in this batch's autograd graph (``move=
  upstream``): for a chain network these are all parameters of layers 1..i−1, norms' γ/β and biases included
  (they belong to the paper's "layers"); in a residual network a parallel branch is not "before" a layer it
  does not feed. ``move=tracked`` moves only the tracked layers among them (only W_1..W_{i−1}).
- W_i is the layer's own trainable parameters (weight and bias), compared as one vector.
- Every forward sees the same random draws (dropout masks, noisy-bn noise), so the difference comes from the
  update alone. A layer with nothing upstream (the first one) has G'_i = G_i by definition: l2 = 0, cos = 1,
  with no extra pass.

Cost: one training step (forward, backward, optimizer step) plus one forward and a partial backward per
tracked layer with something upstream.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import nn

from normzoo.errors import SpecError
from normzoo.probe import Probe, ProbeContext, Values, preserved_state
from normzoo_probes.common import (batch_loss, clone_all, forward_hooks, gradients, own_params, rng_rewinder,
                                   to_floats, tracked_layers)

MOVES = ("upstream", "tracked")


class ICSProbe(Probe):
    """Per tracked layer, in forward order: ``layers`` (names), ``l2`` = ‖G_i − G'_i‖₂, ``cos`` = cos(G_i, G'_i),
    ``rel_l2`` = ‖G_i − G'_i‖₂ / ‖G_i‖₂ and ``grad_norm`` = ‖G_i‖₂.

    cos is 1 when both gradients are zero and 0 when only one is; rel_l2 is 0 when G_i = G'_i = 0 and inf when
    only G_i is zero. Tracked layers that do not run in the forward pass are left out.
    """

    name = "ics"
    report = "normzoo_probes.reports.ics:ICSReport"
    summary = "internal covariate shift per layer: ‖G_i − G'_i‖ and cos(G_i, G'_i) after the earlier layers' update"
    reference = "Santurkar et al. 2018, How Does Batch Normalization Help Optimization?, Definition 2.1"

    def __init__(self, *, layers: str = "weighted", move: Literal["upstream", "tracked"] = "upstream",
                 **schedule) -> None:
        super().__init__(**schedule)
        if move not in MOVES:
            raise SpecError(f"{self.name}: move must be one of {', '.join(MOVES)}, got '{move}'")
        self.layers, self.move = layers, move

    def measure(self, ctx: ProbeContext) -> Values:
        model = ctx.model
        tracked = tracked_layers(model, self.layers)
        params = list(model.parameters())
        with preserved_state(model, ctx.optimizer), torch.enable_grad():
            rewind = rng_rewinder()
            loss, inputs_of = _traced_loss(ctx, tracked)
            modules = dict(tracked)
            candidates = (None if self.move == "upstream"
                          else {id(p) for name in inputs_of for p in own_params(modules[name])})
            moved = {name: _upstream(roots, exclude=own_params(modules[name]), among=candidates)
                     for name, roots in inputs_of.items()}
            for p in params:
                p.grad = None
            loss.backward()
            before_grads = {name: [_grad_or_zeros(p) for p in own_params(modules[name])] for name in inputs_of}
            before, after = _optimizer_update(ctx.optimizer, params)
            current: set[int] = set()
            sums = []
            for name, ids in moved.items():
                g = before_grads[name]
                if not ids:
                    sums.append(_sums(g, g))
                    continue
                _set_params(params, before, after, changed=current ^ ids, moved=ids)
                current = ids
                rewind()
                sums.append(_sums(g, gradients(batch_loss(ctx), own_params(modules[name]))))
            # Every layer's sums stayed on the device; one transfer brings them all to the host.
            flat = to_floats([value for row in sums for value in row])
        rows = [_compare(*flat[i:i + 4]) for i in range(0, len(flat), 4)]
        return {"layers": list(moved), **{key: [row[k] for row in rows]
                                          for k, key in enumerate(("l2", "cos", "rel_l2", "grad_norm"))}}


def _traced_loss(ctx: ProbeContext, tracked: Sequence[tuple[str, nn.Module]]
                 ) -> tuple[torch.Tensor, dict[str, list[torch.autograd.graph.Node]]]:
    """The batch loss, and for each tracked layer (in the order its first call runs) the autograd nodes that
    produced its inputs: the roots from which its upstream parameters are found."""
    inputs_of: dict[str, list[torch.autograd.graph.Node]] = {}

    def record(name: str, module: nn.Module, args: tuple) -> None:
        if name not in inputs_of:
            # The node now, not the tensor: a later in-place op would re-point the tensor's grad_fn downstream.
            inputs_of[name] = [a.grad_fn for a in args if torch.is_tensor(a) and a.grad_fn is not None]

    with forward_hooks(tracked, record, pre=True):
        loss = batch_loss(ctx)
    return loss, inputs_of


def _upstream(roots: Iterable[torch.autograd.graph.Node], *, exclude: Sequence[torch.Tensor],
              among: set[int] | None) -> set[int]:
    """ids of the parameters (leaves of the graph) reachable from ``roots``, minus ``exclude`` (layer i's own
    W_i stays put even if it was used earlier, e.g. tied weights), restricted to ``among`` when given."""
    seen: set[torch.autograd.graph.Node] = set()
    found: set[int] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            found.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions)
    found -= {id(p) for p in exclude}
    return found if among is None else found & among


@torch.no_grad()
def _optimizer_update(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]
                      ) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
    """Run the real optimizer step on the gradients in ``.grad``; return the parameters before it and (by id)
    after it, with the model put back to the parameters before it. The optimizer's state is left advanced —
    the caller's :func:`preserved_state` restores it."""
    before = clone_all(params)
    optimizer.step()
    after = dict(zip(map(id, params), clone_all(params)))
    torch._foreach_copy_(list(params), before)
    return before, after


@torch.no_grad()
def _set_params(params: Sequence[nn.Parameter], before: Sequence[torch.Tensor], after: dict[int, torch.Tensor],
                *, changed: set[int], moved: set[int]) -> None:
    """Put each parameter whose id is in ``changed`` at its updated value if in ``moved``, else its old one."""
    pairs = [(p, after[id(p)] if id(p) in moved else old) for p, old in zip(params, before) if id(p) in changed]
    if pairs:
        torch._foreach_copy_([p for p, _ in pairs], [value for _, value in pairs])


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


def _sums(g: Sequence[torch.Tensor], g_moved: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """(‖g − g'‖, ‖g‖, ‖g'‖, ⟨g, g'⟩) as float64 scalar tensors, each list of tensors seen as one vector."""
    a, b = _flat(g), _flat(g_moved)
    return [*(torch.linalg.vector_norm(v) for v in (a - b, a, b)), a @ b]


def _compare(l2: float, na: float, nb: float, dot: float) -> tuple[float, float, float, float]:
    """(‖g − g'‖, cos(g, g'), ‖g − g'‖/‖g‖, ‖g‖) from :func:`_sums`."""
    if na == 0 or nb == 0:
        cos = 1.0 if na == nb else 0.0
    else:
        cos = 1.0 if l2 == 0 else max(-1.0, min(1.0, dot / (na * nb)))
    rel = l2 / na if na else (0.0 if l2 == 0 else math.inf)
    return l2, cos, rel, na


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors]) if tensors else torch.zeros(0).double()
