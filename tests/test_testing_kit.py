"""The conformance kit fails the norms it should: each check against a norm broken in exactly its way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normzoo import NormTraits, hookimpl
from normzoo.testing import (
    check_channels_last,
    check_constructor,
    check_eval_deterministic,
    check_gradcheck,
    check_norm,
    check_running_stats_train_only,
    check_shapes,
    check_state_dict_round_trip,
    check_sync,
    sync_check_skipped,
)


class Scale(nn.Module):
    """A correct per-sample norm to break: y = γ·x/rms(x over C, H, W) + β."""

    traits = NormTraits(batch_dependent=False, running_stats=False, min_values=1)

    def __init__(self, num_features, *, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        rms = wide.pow(2).mean(dim=tuple(range(1, x.dim())), keepdim=True).add(self.eps).sqrt()
        return (x / rms.to(x.dtype)) * self.weight.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)


class WrongGradient(Scale):
    def forward(self, x):
        return _Halved.apply(super().forward(x))


class _Halved(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad / 2


class StatsInEval(Scale):
    traits = NormTraits(batch_dependent=True, running_stats=True, min_values=2)

    def __init__(self, num_features, **kwargs):
        super().__init__(num_features, **kwargs)
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x):
        self.running_mean += 1  # in eval mode too: wrong
        return super().forward(x)


class BatchInEval(Scale):
    def forward(self, x):
        return super().forward(x) - x.mean(0, keepdim=True)  # depends on the batch in eval mode too


class Only4d(Scale):
    def forward(self, x):
        assert x.dim() == 4
        return super().forward(x)


class ContiguousOnly(Scale):
    def forward(self, x):
        out = super().forward(x)
        return out + 1.0 if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4 else out


class ForgetsBuffers(StatsInEval):
    def forward(self, x):
        if self.training:
            self.running_mean += 1
            return Scale.forward(self, x)
        return Scale.forward(self, x) - self.running_mean.view(1, -1, *[1] * (x.dim() - 2))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "running_mean")

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.setdefault(prefix + "running_mean", torch.zeros_like(self.running_mean))
        super()._load_from_state_dict(state_dict, prefix, *args)


class IgnoresSync(nn.Module):
    """Batch statistics, and a sync parameter it never uses: each replica normalizes its own half."""

    traits = NormTraits(batch_dependent=True, running_stats=False, min_values=2)

    def __init__(self, num_features, *, sync=False, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps

    def reset_parameters(self):
        pass

    def forward(self, x):
        dims = [0, *range(2, x.dim())]
        return (x - x.mean(dims, keepdim=True)) / (x.var(dims, keepdim=True, unbiased=False) + self.eps).sqrt()


def no_dtype(num_features, *, eps=1e-5, affine=True, device=None, dtype=None):
    return Scale(num_features, eps=eps, affine=affine, device=device)  # dtype dropped


BROKEN = {"kit-ok": Scale, "kit-grad": WrongGradient, "kit-stats": StatsInEval, "kit-batch": BatchInEval,
          "kit-4d": Only4d, "kit-cl": ContiguousOnly, "kit-state": ForgetsBuffers, "kit-dtype": no_dtype,
          "kit-nosync": IgnoresSync}


class KitNorms:
    @hookimpl
    def register_norms(self, register):
        for name, factory in BROKEN.items():
            register(name, factory, summary="for the kit's own tests")


@pytest.fixture
def kit_norms(fresh_plugins):
    fresh_plugins.register(KitNorms(), name="kit")
    return fresh_plugins


def test_a_correct_norm_passes_every_check(kit_norms):
    check_norm("kit-ok")


@pytest.mark.parametrize("spec, check, message", [
    ("kit-grad", check_gradcheck, "gradcheck failed in train mode"),
    ("kit-stats", check_running_stats_train_only, "buffer 'running_mean' changed in eval mode"),
    ("kit-batch", check_eval_deterministic, "eval output depends on the batch"),
    ("kit-4d", check_shapes, None),
    ("kit-cl", check_channels_last, "channels_last output"),
    ("kit-state", check_state_dict_round_trip, "differs"),
    ("kit-dtype", check_constructor, "dtype= not applied"),
    ("kit-nosync", check_sync, "the replicas' outputs are not one process's on the whole batch"),
])
def test_each_check_fails_the_norm_broken_its_way(kit_norms, spec, check, message):
    with pytest.raises(AssertionError, match=message):
        check(spec)
    check("kit-ok")  # and passes the correct one


def test_the_sync_check_passes_a_synced_batch_norm_and_skips_a_norm_without_sync(kit_norms):
    check_sync("bn")
    check_sync("mean-bn")  # the example plugin's own synced norm
    assert sync_check_skipped("kit-ok") == "kit-ok: the norm declares no sync parameter"
    assert sync_check_skipped("bn") is None
