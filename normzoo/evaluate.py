"""Test-set evaluation in eval mode, batched on the device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, x: torch.Tensor,
             y: torch.Tensor, loss_fn: Callable[..., torch.Tensor], *, batch_size: int = 512,
             classification: bool = True) -> dict[str, float]:
    """Mean loss (and accuracy for classification) of ``forward`` over ``(x, y)``; restores train/eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(y), batch_size):
        out = forward(x[start:start + batch_size]).float()
        target = y[start:start + batch_size]
        loss_sum += loss_fn(out, target, reduction="sum").double() / (out[0].numel() if not classification else 1)
        if classification:
            correct += (out.argmax(1) == target).sum()
    model.train(was_training)
    metrics = {"loss": loss_sum.item() / len(y)}
    if classification:
        metrics["acc"] = correct.item() / len(y)
    return metrics
