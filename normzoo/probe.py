"""The probe contract: measurements taken during training that must leave the run untouched.

A probe is a class registered through the ``register_probes`` hook. Its constructor's keyword parameters are
its spec parameters (``landscape:every=100,steps=8``); the schedule parameters below come from :class:`Probe`.
At a scheduled step t the runner calls ``measure(ctx)`` *before* that step's update, on the batch step t is
about to train on, and writes the returned values to ``metrics.jsonl`` as
``{"type": "probe", "probe": name, "step": t, "batch_size": ..., "mode": "train"|"eval", **values}``.

A probe must restore everything it touches: parameters, buffers (BN running statistics), optimizer state,
gradients and RNG state are bit-identical before and after ``measure``. :func:`preserved_state` helps.

How ``normzoo report`` and ``sweep.csv`` present the records is the class attribute ``report``: an import path
``"package.module:Attr"`` of a :class:`normzoo.probe_report.ProbeReport` subclass (a path, not the class, so that
its code loads only when a report is written), or None for the generic presentation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import nn

from normzoo.errors import SpecError
from normzoo.spec import Count, Range, clip

LogSteps = Annotated[int, Range(0, 10_000)]  # log-spaced measurements over a run

Values = dict[str, Any]  # scalars (float/int) and small lists of floats


@dataclass
class ProbeContext:
    """What a probe receives at step ``step``."""

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    targets: torch.Tensor
    optimizer: torch.optim.Optimizer
    lr: float
    step: int
    total_steps: int
    # The whole training set (device-resident, un-augmented), for probes that measure on a fixed subset of it
    # rather than on the step's batch; None when the caller has none to give (probes must then say so).
    train_inputs: torch.Tensor | None = None
    train_targets: torch.Tensor | None = None


class Probe:
    """Base class with the schedule every probe shares.

    every: run every k steps (0: never by period). at: extra steps joined by '+' (``at=0+50+200``).
    init: also run at step 0. log: run at this many log-spaced steps over the run (0: none).
    """

    name = "probe"
    report: str | None = None  # "package.module:Attr" of its ProbeReport (normzoo.probe_report); None: generic

    def __init__(self, *, every: Count = 0, at: str = "", init: bool = True, log: LogSteps = 0) -> None:
        if every < 0 or log < 0:
            raise SpecError(f"{self.name}: every and log must be ≥ 0")
        try:
            self.at = {int(s) for s in at.split("+") if s.strip()}
        except ValueError:
            raise SpecError(f"{self.name}: at must be steps joined by '+', e.g. at=0+100, got '{clip(at)}'") from None
        if any(s < 0 for s in self.at):
            raise SpecError(f"{self.name}: at must list steps ≥ 0, got '{clip(at)}'")
        self.every, self.init, self.log = every, init, log
        self._log_steps: set[int] | None = None

    def due(self, step: int, total_steps: int) -> bool:
        if self._log_steps is None:
            self._log_steps = ({int(round(math.exp(i * math.log(max(total_steps - 1, 1)) / max(self.log - 1, 1))))
                                for i in range(self.log)} if self.log else set())
        return ((self.init and step == 0) or step in self.at or step in self._log_steps
                or (self.every > 0 and step % self.every == 0))

    def measure(self, ctx: ProbeContext) -> Values:
        raise NotImplementedError


@contextlib.contextmanager
def preserved_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Snapshot parameters, buffers, gradients, train/eval mode, optimizer state and RNG; restore on exit.

    The snapshot is a fused ``torch._foreach_copy_`` (one per device and dtype) into uninitialized buffers
    (``empty_like``, same strides) instead of a clone per tensor: on a GPU the per-tensor launches cost more than
    the copies. On exit parameters and buffers are copied back in place the same way (the model's tensors must
    stay the ones the optimizer and any compiled graph hold), while gradients and optimizer state are simply
    replaced by their snapshots — no copy at all, whatever the probe did to the old ones (accumulated into
    ``.grad``, stepped the optimizer); state entries a probe created are dropped.
    """
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = list(model.buffers())
    modes = [m.training for m in model.modules()]
    opt_state = {k: dict(s) for k, s in optimizer.state.items()} if optimizer is not None else {}
    in_place = params + buffers
    swapped = [g for g in grads if g is not None] + [v for s in opt_state.values() for v in s.values()
                                                     if torch.is_tensor(v)]
    saved = [torch.empty_like(t) for t in in_place + swapped]
    _copy_all(saved, in_place + swapped)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            _copy_all(in_place, saved[:len(in_place)])
            copies = iter(saved[len(in_place):])  # in the order ``swapped`` listed them
            for p, g in zip(params, grads):
                p.grad = None if g is None else next(copies)
            if optimizer is not None:
                optimizer.state.clear()
                optimizer.state.update({k: {n: next(copies) if torch.is_tensor(v) else v for n, v in s.items()}
                                        for k, s in opt_state.items()})
            for m, mode in zip(model.modules(), modes):
                m.training = mode


@torch.no_grad()
def _copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``d.copy_(s)`` for every pair, as one ``_foreach_copy_`` per (device, dtype): the fused kernel's fast path
    wants one of each (optimizer state mixes them, e.g. Adam's CPU ``step`` counters next to CUDA moments)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s in zip(destinations, sources):
        pair = groups.setdefault((d.device, d.dtype), ([], []))
        pair[0].append(d)
        pair[1].append(s)
    for dst, src in groups.values():
        torch._foreach_copy_(dst, src)
