"""normzoo-timm: every bridged timm norm is registered through the entry point and keeps the norm contract."""

from __future__ import annotations

import pytest
import torch
from timm import layers

from normzoo.norms.base import create_norm
from normzoo.plugins import get_plugins, registry
from normzoo.testing import norm_contract, sample
from normzoo_timm.plugin import TIMM_NORMS

NAMES = sorted(TIMM_NORMS)


def test_registered_through_the_entry_point_with_timms_parameters():
    info = get_plugins().info["timm_norms"]
    assert info.source == "entry point normzoo-timm" and info.hooks == ["register_norms"] and not info.errors
    norms = registry("norms")
    assert set(NAMES) <= set(norms.names())
    assert {p.name for p in norms.get("timm-evonorm-s0").params} >= {"eps", "affine", "groups", "apply_act"}
    assert {p.name for p in norms.get("timm-evonorm-b0").params} >= {"eps", "momentum", "apply_act"}
    assert norms.get("timm-evonorm-b0").params[0].default == pytest.approx(1e-3)  # timm's own eps default
    assert norms.get("timm-frn").reference.startswith("Singh & Krishnan")


@pytest.mark.parametrize("name", NAMES)
def test_is_the_timm_layer_with_the_same_output(name):
    """Bridged and plain timm layers give the same result on 4-D input (the bridge only adapts)."""
    module = create_norm(name + (",groups=2" if "evonorm-s" in name else ""), 4)
    plain = getattr(layers, TIMM_NORMS[name][0])(4, **({"groups": 2} if "evonorm-s" in name else {}),
                                                 eps=module.eps)
    plain.load_state_dict(module.state_dict())
    assert isinstance(module, type(plain))
    x = sample((6, 4, 5, 5))
    for train in (True, False):
        torch.testing.assert_close(module.train(train)(x), plain.train(train)(x))


def test_groups_are_lowered_to_a_divisor_and_affine_false_freezes():
    module = create_norm("timm-evonorm-s0:groups=32", 12)
    assert module.groups == 12
    frozen = create_norm("timm-evonorm-b0,affine=false", 4)
    assert not frozen.weight.requires_grad and not frozen.bias.requires_grad and frozen.v.requires_grad
    assert create_norm("timm-layernorm2d,affine=false", 4).weight is None


test_timm_norms_keep_the_norm_contract = norm_contract(NAMES)
