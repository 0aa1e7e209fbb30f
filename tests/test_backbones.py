"""Backbones and build_model: every registered norm on every built-in backbone kind, on tiny CPU inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from normzoo.errors import NormzooError, SpecError
from normzoo.placement import find_norms
from normzoo.models import build_model
from normzoo.plugins import registry

NORMS = registry("norms").names()

# (backbone spec, input size): tiny widths; timm models at 64×64 so their last stage is 2×2, not 1×1
BACKBONES = [
    ("vgg11,width=0.125", 32),
    ("resnet20,width=0.25", 32),
    ("timm:test_resnet", 64),  # timm model that takes norm_layer= (timm's small ResNet: both block kinds)
    ("timm:mobilenetv3_small_050", 64),  # timm norm-act model (BatchNormAct2d), norms swapped by module
]


def test_builtin_norms_are_registered():
    assert {"none", "bn"} <= set(NORMS), f"registered norms: {NORMS}"


def _assert_only_norm(model: nn.Module, norm: str) -> None:
    spec = registry("norms").parse(norm)
    found = find_norms(model)
    if spec.family == "none":
        assert found == [], [(n, type(m).__name__) for n, m in found]
        return
    assert found, "no norm in the model"
    factory = registry("norms").get(spec.family).factory
    for name, module in found:
        assert getattr(module, "normzoo_spec", None) == spec.canonical(), (name, type(module).__name__)
        if isinstance(factory, type):
            assert isinstance(module, factory), (name, type(module).__name__)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backbone, size", BACKBONES, ids=[b for b, _ in BACKBONES])
def test_every_norm_on_every_backbone(backbone, size, norm):
    torch.manual_seed(0)
    model = build_model(backbone, norm, num_classes=10, in_chans=3)
    _assert_only_norm(model, norm)
    x = torch.randn(4, 3, size, size)
    out = model.train()(x)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize("norm", NORMS)
def test_config_round_trip_every_norm(norm):
    torch.manual_seed(0)
    model = build_model("vgg11,width=0.125", norm, num_classes=7, in_chans=1)
    config = model.normzoo_config
    assert json.loads(json.dumps(config)) == config
    assert config["norm"] == registry("norms").parse(norm).canonical()
    rebuilt = build_model(**config)
    assert rebuilt.normzoo_config == config
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("backbone", ["vgg13,width=0.0625,glorot=true", "resnet20,width=0.125", "timm:resnet18",
                                      "timm:mobilenetv3_small_050", "dln,depth=5,width=4"])
def test_config_round_trip_backbones(backbone):
    model = build_model(backbone, "bn")
    config = model.normzoo_config
    assert config["backbone"] == registry("backbones").parse(backbone).canonical()
    rebuilt = build_model(**json.loads(json.dumps(config)))
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize("backbone", ["vgg11,width=0.125", "resnet20,width=0.125", "timm:mobilenetv3_small_050",
                                      "dln"])
def test_build_is_deterministic_given_seed(backbone):
    torch.manual_seed(3)
    a = build_model(backbone, "bn").state_dict()
    torch.manual_seed(3)
    b = build_model(backbone, "bn").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_canonical_backbone_specs():
    assert build_model("vgg11,width=0.125", "none").normzoo_config["backbone"] == "vgg11,width=0.125,glorot=false"
    assert build_model("timm:resnet18", "none").normzoo_config["backbone"] == "timm:resnet18"
    assert build_model("dln", "none").normzoo_config["backbone"] == "dln,depth=25,width=10"


# -- VGG -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [11, 13, 16, 19])
def test_vgg_matches_torchvision_configs(depth):
    from torchvision.models.vgg import cfgs

    from normzoo.backbones.vgg import DEPTH_TO_CFG

    model = build_model(f"vgg{depth}", "none", device="meta")  # full width, no memory
    layers = []
    for module in model.features:
        if isinstance(module, nn.Conv2d):
            layers.append(module.out_channels)
            assert module.kernel_size == (3, 3) and module.padding == (1, 1) and module.bias is not None
        elif isinstance(module, nn.MaxPool2d):
            layers.append("M")
    assert layers == cfgs[DEPTH_TO_CFG[depth]]
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1  # small head, not 3 x 4096-wide
    assert model.classifier.in_features == 512 and model.classifier.out_features == 10


def test_vgg_width_norm_placement_and_bias():
    model = build_model("vgg11,width=0.125", "bn")
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 32, 64, 64, 64, 64]
    assert all(c.bias is None for c in convs)  # a norm follows every conv
    layers = list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):  # conv -> norm -> ReLU
            assert hasattr(layers[i + 1], "normzoo_spec") and isinstance(layers[i + 2], nn.ReLU)
    tiny = build_model("vgg11,width=0.001", "none")
    assert {c.out_channels for c in tiny.modules() if isinstance(c, nn.Conv2d)} == {1}


def test_vgg_small_inputs_and_channels():
    model = build_model("vgg11,width=0.125", "bn", in_chans=1, num_classes=4)
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 4)  # MNIST-sized inputs reach the head


def test_vgg_glorot_init():
    model = build_model("vgg11,width=0.125,glorot=true", "none")
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_out, fan_in = module.weight.shape[0], module.weight[0].numel()
            receptive = module.weight[0, 0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out * receptive))
            assert module.weight.abs().max() <= bound + 1e-6
            assert torch.count_nonzero(module.bias) == 0


# -- CIFAR ResNet --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [20, 56, 110])
def test_resnet_has_6n_plus_2_weighted_layers(depth):
    from normzoo.backbones.resnet_cifar import ShortcutA

    model = build_model(f"resnet{depth},width=0.0625", "bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == depth and len(linears) == 1
    assert len(find_norms(model)) == len(convs)  # a norm after every conv
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2 and not any(list(s.parameters()) for s in shortcuts)  # option A: parameter-free


def test_resnet_stage_widths_and_shapes():
    model = build_model("resnet20", "none")
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert model.layer2[0].conv1.stride == (2, 2) and model.conv1.bias is not None
    x = torch.randn(2, 16, 8, 8)
    assert model.layer2[0].shortcut(x).shape == (2, 32, 4, 4)
    assert model.layer2[0].shortcut(x)[:, 8:24].equal(x[:, :, ::2, ::2])  # zero channels split around x
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_rejects_bad_depth():
    from normzoo.backbones.resnet_cifar import build_resnet

    with pytest.raises(NormzooError, match="6n\\+2"):
        build_resnet(21, norm_layer=lambda c, **kw: nn.Identity())


# -- deep linear network -------------------------------------------------------------------------------------
def test_dln_shapes():
    model = build_model("dln", "bn")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 25 and all(m.weight.shape == (10, 10) and m.bias is None for m in linears)
    assert len(find_norms(model)) == 24
    assert model(torch.randn(8, 10)).shape == (8, 10)
    plain = build_model("dln,depth=3,width=5", "none")
    assert len(find_norms(plain)) == 0 and len(plain.layers) == 5  # Identity where the norms would be
    assert list(plain.state_dict()) == ["layers.0.weight", "layers.2.weight", "layers.4.weight"]
    x = torch.randn(4, 5)
    w = [m.weight for m in plain.linear_layers()]
    assert torch.allclose(plain(x), x @ w[0].T @ w[1].T @ w[2].T, atol=1e-5)  # purely linear
    with pytest.raises(NormzooError, match="width=7"):
        plain(torch.randn(4, 7))


# -- errors --------------------------------------------------------------------------------------------------
def test_unknown_backbone_suggests():
    with pytest.raises(SpecError, match="vgg1"):
        build_model("vgg12", "bn")
    with pytest.raises(SpecError, match="width"):
        build_model("vgg11,widht=0.5", "bn")


def test_unknown_timm_model_suggests():
    with pytest.raises(NormzooError, match="resnet18"):
        build_model("timm:resnt18", "bn")


def test_unknown_norm():
    with pytest.raises(SpecError):
        build_model("vgg11,width=0.125", "no-such-norm")


def test_timm_transformer_keeps_token_layernorms():
    with pytest.warns(UserWarning, match="token"):
        model = build_model("timm:test_vit", "bn")
    assert find_norms(model) == []
    assert isinstance(model.blocks[0].norm1, nn.LayerNorm)
