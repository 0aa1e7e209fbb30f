"""normzoo.placement: swapping norms, inserting them into norm-free models, removing them with ``none``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from normzoo.placement import find_norms, find_token_norms, final_classifier, inject, replace_norms
from normzoo.plugins import registry

NORMS = registry("norms").names()
REAL_NORMS = [n for n in NORMS if n != "none"]


def _spec(norm: str) -> str:
    return registry("norms").parse(norm).canonical()


def plain_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 8), nn.ReLU(),
        nn.Linear(8, 3),
    )


def normed_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.GroupNorm(2, 6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.InstanceNorm2d(6, affine=True), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 3),
    )


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.train()(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    return out


@pytest.mark.parametrize("norm", REAL_NORMS)
def test_insert_into_plain_sequential(norm):
    model = inject(plain_net(), norm)
    for i in (0, 2, 6):  # conv, conv, hidden linear: now Sequential(layer, norm)
        assert isinstance(model[i], nn.Sequential) and list(model[i]._modules) == ["layer", "norm"]
        assert model[i].norm.normzoo_spec == _spec(norm)
    assert isinstance(model[8], nn.Linear)  # not after the final classifier
    assert len(find_norms(model)) == 3
    assert isinstance(model[1], nn.ReLU)  # inserted before the nonlinearity
    assert _run(model, torch.randn(4, 3, 8, 8)).shape == (4, 3)


def test_insert_none_is_a_no_op_and_state_dict_keys():
    model = inject(plain_net(), "none")
    assert [type(m) for m in model] == [type(m) for m in plain_net()]
    keys = list(inject(plain_net(), "bn").state_dict())
    assert "0.layer.weight" in keys and "8.weight" in keys


def test_insert_skips_get_classifier():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(self.body(x))

        def get_classifier(self):
            return self.head

    net = Net()
    assert final_classifier(net) is net.head
    net = inject(net, "bn")
    assert isinstance(net.head, nn.Linear) and isinstance(net.body, nn.Sequential)


@pytest.mark.parametrize("norm", NORMS)
def test_swap_torch_norms(norm):
    model = inject(normed_net(), norm)
    found = find_norms(model)
    if norm == "none":
        assert found == []
    else:
        assert len(found) == 4 and all(m.normzoo_spec == _spec(norm) for _, m in found)
    assert _run(model, torch.randn(4, 3, 8, 8)).shape == (4, 3)


def test_none_removes_and_swap_is_idempotent():
    model = inject(normed_net(), "bn")
    first = [m for _, m in find_norms(model)]
    inject(model, "bn")  # same spec: the existing zoo norms are kept (with their state)
    assert [m for _, m in find_norms(model)] == first
    inject(model, "none")
    assert find_norms(model) == []
    assert isinstance(model[1], nn.Identity) and isinstance(model[2], nn.ReLU)


def test_swap_preserves_dtype_mode_and_sharing():
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Conv2d(4, 4, 1), shared).double().eval()
    model = inject(model, "bn")
    assert model[1] is model[3]  # a shared norm stays shared
    assert not model[1].training
    tensors = list(model[1].parameters()) + [b for b in model[1].buffers() if b.is_floating_point()]
    assert tensors and all(t.dtype == torch.float64 for t in tensors)


def test_root_norm_and_replace_norms_keep():
    new = inject(nn.BatchNorm2d(5), "bn")
    assert new.normzoo_spec == _spec("bn")
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    replace_norms(model, "bn", keep=[model[0]])
    assert isinstance(model[0], nn.BatchNorm2d) and hasattr(model[1], "normzoo_spec")


def test_timm_norm_act_layers_keep_activation():
    from timm.layers import BatchNormAct2d, GroupNormAct, LayerNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4, act_layer=nn.SiLU),
                          nn.Conv2d(4, 4, 1), GroupNormAct(4, num_groups=2, act_layer=nn.ReLU),
                          nn.Conv2d(4, 4, 1), LayerNorm2d(4))
    model = inject(model, "bn")
    assert list(model[1]._modules) == ["norm", "drop", "act"] and isinstance(model[1].act, nn.SiLU)
    assert model[1].norm.normzoo_spec == _spec("bn")
    assert isinstance(model[3].act, nn.ReLU)
    assert hasattr(model[5], "normzoo_spec")
    assert len(find_norms(model)) == 3
    _run(model, torch.randn(4, 3, 4, 4))
    inject(model, "none")
    assert find_norms(model) == []
    assert isinstance(model[1].act, nn.SiLU) and isinstance(model[1].norm, nn.Identity)


def test_token_layernorms_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="token"):
        inject(model, "bn")
    assert isinstance(model[1], nn.LayerNorm) and isinstance(model[0], nn.Linear)
    assert find_norms(model) == [] and len(find_token_norms(model)) == 1
    mixed = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(2), nn.LayerNorm(16))
    with pytest.warns(UserWarning, match="kept 1"):
        inject(mixed, "bn")
    assert hasattr(mixed[1], "normzoo_spec") and isinstance(mixed[3], nn.LayerNorm)


@pytest.mark.parametrize("model_name", ["test_efficientnet_gn", "test_efficientnet_ln", "test_coatnet"])
def test_timm_norm_act_variants(model_name):
    import timm

    extra = {"img_size": 64} if model_name == "test_coatnet" else {}  # coatnet's relative positions are sized
    model = inject(timm.create_model(model_name, num_classes=5, **extra), "bn")
    found = find_norms(model)
    assert found and all(m.normzoo_spec == _spec("bn") for _, m in found)
    assert _run(model, torch.randn(4, 3, 64, 64)).shape == (4, 5)


def test_timm_mixed_model_and_norm_free_model():
    from normzoo.models import build_model

    with pytest.warns(UserWarning, match="token"):
        convnext = build_model("timm:test_convnext", "bn")  # LayerNorm2d swapped, channels-last LayerNorm kept
    assert find_norms(convnext) and find_token_norms(convnext)
    assert convnext(torch.randn(4, 3, 64, 64)).shape == (4, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nfnet = build_model("timm:test_nfnet", "bn")  # no norms at all: inserted after convs
    assert len(find_norms(nfnet)) > 0
    assert isinstance(nfnet.get_classifier(), nn.Linear)
    assert nfnet(torch.randn(4, 3, 64, 64)).shape == (4, 10)
