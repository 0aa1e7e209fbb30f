"""The probe contract: measurements taken during training that must leave the run untouched.

A probe is a class registered through the ``register_probes`` hook. Its constructor's keyword parameters are
its spec parameters (``landscape:every=100,steps=8``); the schedule parameters below come from :class:`Probe`.
At a scheduled step t the runner calls ``measure(ctx)`` *before* that step's update, on the batch step t is
about to train on, and writes the returned values to ``metrics.jsonl`` as
``{"type": "probe", "probe": name, "step": t, "batch_size": ..., "mode": "train"|"eval", **values}``.

A probe must restore everything it touches: parameters, buffers (BN running statistics), optimizer state,
gradients and RNG state are bit-identical before and after ``measure``. :func:`preserved_state` helps.
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


class Probe:
    """Base class with the schedule every probe shares.

    every: run every k steps (0: never by period). at: extra steps joined by '+' (``at=0+50+200``).
    init: also run at step 0. log: run at this many log-spaced steps over the run (0: none).
    """

    name = "probe"

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
    """Snapshot parameters, buffers, gradients, train/eval mode, optimizer state and RNG; restore on exit."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    opt_state = None
    if optimizer is not None:
        opt_state = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
                     for k, s in optimizer.state.items()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved, g in zip(model.parameters(), params, grads):
                    p.copy_(saved)
                    p.grad = g
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
            for m, mode in zip(model.modules(), modes):
                m.training = mode
            if optimizer is not None and opt_state is not None:
                optimizer.state.clear()
                optimizer.state.update(opt_state)
