"""SGD and Adam exactly as ``torch.optim``'s, without the start-up cost ``torch.optim`` carries.

Every method of ``torch.optim.Optimizer`` (``add_param_group``, ``zero_grad``, ``state_dict``, ``step``, …) is
wrapped so that TorchDynamo skips it, and the wrapper imports ``torch._dynamo`` on its first call: 7 s on a 2-core
machine, longer than ``import torch`` itself, paid by every run that never compiles anything. These classes are
``torch.optim.SGD`` and ``torch.optim.Adam`` (same constructor, hooks, ``param_groups``, ``state`` and
``state_dict`` layout, so checkpoints move freely between them), with the bookkeeping methods taken from under
that wrapper and ``step`` written out below with the same tensor operations, in the same order, as torch's
multi-tensor implementation: the updates are bit-identical (``tests/test_optim.py``).

Only the options normzoo's runner sets are implemented; ``maximize``, ``differentiable``, ``fused``, ``capturable``
and AMSGrad are refused rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _unwrapped(method: Callable[..., Any]) -> Callable[..., Any]:
    """The function under torch's ``_disable_dynamo`` wrapper (the wrapper itself where a torch has none)."""
    return getattr(method, "__wrapped__", method)


_UNSUPPORTED = ("maximize", "differentiable", "fused", "capturable", "amsgrad")


class _PlainMethods:
    add_param_group = _unwrapped(torch.optim.Optimizer.add_param_group)
    zero_grad = _unwrapped(torch.optim.Optimizer.zero_grad)
    state_dict = _unwrapped(torch.optim.Optimizer.state_dict)
    load_state_dict = _unwrapped(torch.optim.Optimizer.load_state_dict)

    param_groups: list[dict[str, Any]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, params in self._plain_groups():
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _plain_groups(self) -> list[tuple[dict[str, Any], list[torch.Tensor]]]:
        """Each group with its parameters that have a gradient."""
        groups = []
        for group in self.param_groups:
            if any(group.get(option) for option in _UNSUPPORTED):
                options = ", ".join(option for option in _UNSUPPORTED if group.get(option))
                raise NotImplementedError(f"normzoo's {type(self).__name__} does not implement {options}; "
                                          f"use torch.optim.{type(self).__name__}")
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise NotImplementedError("sparse gradients are not supported")
            groups.append((group, params))
        return groups


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class SGD(_PlainMethods, torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) without importing ``torch._dynamo``."""

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
        weight_decay, nesterov = group["weight_decay"], group["nesterov"]
        grads = [p.grad for p in params]
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if momentum != 0:
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            if all(b is not None for b in buffers):
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads, alpha=1 - dampening)
            else:  # the first step: each buffer starts as its gradient
                for i, (p, grad) in enumerate(zip(params, grads)):
                    if buffers[i] is None:
                        buffers[i] = self.state[p]["momentum_buffer"] = torch.clone(grad).detach()
                    else:
                        buffers[i].mul_(momentum).add_(grad, alpha=1 - dampening)
            grads = torch._foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
        torch._foreach_add_(params, grads, alpha=-lr)


class Adam(_PlainMethods, torch.optim.Adam):
    """``torch.optim.Adam`` (L2 weight decay, not AdamW's) without importing ``torch._dynamo``."""

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if group.get("decoupled_weight_decay"):
            raise NotImplementedError("decoupled weight decay (AdamW) is not implemented; use torch.optim.AdamW")
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if not state:  # as torch.optim.Adam: the step count is a CPU scalar
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        grads = [p.grad for p in params]
        torch._foreach_add_(steps, 1)
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_sizes = [(lr / (1 - beta1 ** step.item())) * -1 for step in steps]
        bias_correction2_sqrt = [(1 - beta2 ** step.item()) ** 0.5 for step in steps]
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, bias_correction2_sqrt)
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)
