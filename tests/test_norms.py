"""The built-in norms: formulas, gradients, train/eval behaviour, dtypes, layouts and Algorithm 1's noise.

The norm contract (``normzoo.testing``) runs over every registered norm name (plugin norms included) plus
variants of the built-ins; the formula tests compare against float64 implementations written here,
independently of the modules' code.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from normzoo.errors import SpecError
from normzoo.norms import (
    BatchNorm,
    GroupNorm,
    InstanceNorm,
    L1BatchNorm,
    LayerNorm,
    LpNorm,
    NoisyBatchNorm,
    NoNorm,
    NormTraits,
    TopKBatchNorm,
)
from normzoo.norms.base import create_norm, parse_norm, traits_of
from normzoo.plugins import registry
from normzoo.testing import build, check_gradcheck, norm_contract, sample, seeded

BUILTINS = {"none": NoNorm, "bn": BatchNorm, "noisy-bn": NoisyBatchNorm, "lp": LpNorm, "gn": GroupNorm,
            "ln": LayerNorm, "in": InstanceNorm, "l1-bn": L1BatchNorm, "topk-bn": TopKBatchNorm}
VARIANTS = ["lp:1", "lp:inf", "lp:1,centered=true", "lp:2,centered=true", "lp:inf,centered=true", "lp:3",
            "lp:1.5,centered=true", "gn:2", "topk-bn:3", "noisy-bn:where=before", "noisy-bn:bn=false",
            "noisy-bn:eval=none", "noisy-bn:recompute=true"]
SPECS = sorted(registry("norms").names()) + VARIANTS
C = 4


# -- registration and constructor contract -----------------------------------------------------------------------
def test_builtins_registered_with_their_classes():
    reg = registry("norms")
    for name, cls in BUILTINS.items():
        assert reg.get(name).factory is cls
    assert reg.get("lp").positional == "p" and reg.get("gn").positional == "groups"
    assert reg.get("topk-bn").positional == "k"


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_constructor_contract(name):
    cls = BUILTINS[name]
    sig = inspect.signature(cls)
    params = list(sig.parameters.values())
    assert params[0].name == "num_features"
    for p in params[1:]:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
    assert {"eps", "affine", "device", "dtype"} <= set(sig.parameters)
    assert sig.parameters["eps"].default == 1e-5 and sig.parameters["affine"].default is True
    assert isinstance(cls.traits, NormTraits)
    cls(3).reset_parameters()
    if cls.traits.running_stats:
        assert sig.parameters["momentum"].default == 0.1
    # every spec parameter is typed by the grammar (none silently dropped)
    typed = {p.name for p in registry("norms").get(name).params}
    assert typed == {p.name for p in params[1:] if p.name not in ("device", "dtype")}


def test_spec_parsing_and_canonical_forms():
    assert parse_norm("lp:inf").kwargs["p"] == math.inf
    assert parse_norm("lp:1,centered=true").canonical() == \
        "lp:1,centered=true,eps=1e-05,affine=true,momentum=0.1,sync=false"
    assert create_norm("noisy-bn:where=before,eval=none", 3).where == "before"
    with pytest.raises(SpecError, match="after, before"):
        parse_norm("noisy-bn:where=middle")
    with pytest.raises(SpecError, match="'p' must be in 1..8 or inf"):
        create_norm("lp:0.5", 3)


def test_group_norm_uses_the_largest_divisor_at_most_groups():
    assert create_norm("gn:32", 48).num_groups == 24
    assert create_norm("gn:32", 10).num_groups == 10
    assert create_norm("gn:4", 6).num_groups == 3
    assert create_norm("gn:32", 64).num_groups == 32
    assert create_norm("ln", 12).num_groups == 1 and create_norm("in", 12).num_groups == 12


def test_traits():
    assert not traits_of(NoNorm(3)).batch_dependent
    for name in ("bn", "noisy-bn", "lp", "l1-bn", "topk-bn"):
        assert traits_of(create_norm(name, 3)) == NormTraits(True, True, 2)
    for name in ("gn", "ln", "in"):
        assert traits_of(create_norm(name, 4)) == NormTraits(False, False, 2)
    assert traits_of(create_norm("noisy-bn:bn=false", 3)) == NormTraits(False, False, 1)


# -- float64 formulas written independently of the modules ---------------------------------------------------------
def formula(spec, x, weight, bias, seed=0, noise_dtype=None):
    """Train-mode output of a built-in norm spec, in float64 from the definitions.

    Noisy norms draw their noise in ``noise_dtype`` (the module's dtype; default x's) so both see the same draws.
    """
    s = parse_norm(spec)
    kw, eps = s.kwargs, s.kwargs.get("eps", 1e-5)
    x4 = x if x.dim() == 4 else x[:, :, None, None]
    N, Ch = x4.shape[:2]
    per_channel = x4.transpose(0, 1).reshape(Ch, -1)  # (C, values)
    mean = per_channel.mean(1)

    def bc(v):
        return v.view(1, -1, 1, 1)

    def finish(y, affine_weight=weight, affine_bias=bias):
        if affine_weight is not None:
            y = y * bc(affine_weight) + bc(affine_bias)
        return y.reshape(x.shape)

    family = s.family
    if family == "none":
        return x
    if family in ("bn", "noisy-bn"):
        var = per_channel.var(1, unbiased=False)
        xhat = (x4 - bc(mean)) / torch.sqrt(bc(var) + eps)
        if family == "bn":
            return finish(xhat)
        torch.manual_seed(seed)

        def draw(fn, shape):
            return fn(shape, dtype=noise_dtype or x.dtype).to(x.dtype)

        mu_c = draw(torch.rand, Ch) * 2 * kw["mu"] - kw["mu"]
        sigma_c = 1 + draw(torch.rand, Ch) * (kw["sigma"] - 1)
        m = bc(mu_c) + (draw(torch.rand, x.shape).reshape(x4.shape) * 2 - 1) * kw["r_mu"]
        sc = bc(sigma_c) + draw(torch.randn, x.shape).reshape(x4.shape) * kw["r_sigma"]
        if not kw["bn"]:
            return (sc * x4 + m).reshape(x.shape)
        if kw["where"] == "after":
            return (sc * finish(xhat).reshape(x4.shape) + m).reshape(x.shape)
        return finish(sc * xhat + m)
    if family in ("lp", "l1-bn", "topk-bn"):
        centered = kw.get("centered", True)
        z = per_channel - mean[:, None] if centered else per_channel
        if family == "l1-bn":
            scale = math.sqrt(math.pi / 2) * z.abs().mean(1)
        elif family == "topk-bn":
            k = min(kw["k"], z.shape[1])
            scale = z.abs().sort(1, descending=True).values[:, :k].mean(1)
        elif math.isinf(kw["p"]):
            scale = z.abs().max(1).values
        else:
            scale = (z.abs() ** kw["p"]).mean(1) ** (1 / kw["p"])
        return finish((x4 - bc(mean)) / (bc(scale) + eps))
    if family in ("gn", "ln", "in"):
        groups = {"ln": 1, "in": Ch}.get(family) or max(g for g in range(1, kw["groups"] + 1) if Ch % g == 0)
        xg = x4.reshape(N, groups, -1)
        y = (xg - xg.mean(2, keepdim=True)) / torch.sqrt(xg.var(2, unbiased=False, keepdim=True) + eps)
        return finish(y.reshape(x4.shape))
    raise AssertionError(f"no formula for {spec}")


BUILTIN_SPECS = [s for s in SPECS if parse_norm(s).family in BUILTINS]


@pytest.mark.parametrize("shape", [(6, C, 3, 5), (10, C)], ids=["4d", "2d"])
@pytest.mark.parametrize("spec", BUILTIN_SPECS)
def test_train_output_matches_float64_formula(spec, shape):
    module = build(spec, dtype=torch.float64).train()
    x = sample(shape, torch.float64)
    expected = formula(spec, x, module.weight if hasattr(module, "weight") else None,
                       module.bias if hasattr(module, "bias") else None)
    torch.testing.assert_close(seeded(module, x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec", BUILTIN_SPECS)
def test_float32_output_matches_formula(spec):
    module = build(spec).train()
    x = sample((16, C, 5, 5))
    expected = formula(spec, x.double(), *(getattr(module, n, None) for n in ("weight", "bias")),
                       noise_dtype=torch.float32)
    torch.testing.assert_close(seeded(module, x).double(), expected.detach(), rtol=1e-4, atol=1e-4)


def test_topk_finds_values_clustered_at_one_position():
    """All top values of a channel at one spatial position (one candidate group) must still be found."""
    x = sample((20, C, 4, 4), torch.float64) * 0.1
    x[:, :, 2, 3] += torch.linspace(5, 10, 20, dtype=torch.float64)[:, None]
    module = build("topk-bn:12", dtype=torch.float64)
    torch.testing.assert_close(module(x), formula("topk-bn:12", x, module.weight, module.bias))


@pytest.mark.parametrize("shape", [(6, 3, 3, 5), (7, 2, 2, 2), (20, 3, 4, 4), (32, 2, 8, 8), (12, 3, 1, 1)])
@pytest.mark.parametrize("k", [1, 3, 10, 100, 10_000])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_topk_stats_finds_the_k_largest_deviations(shape, k, channels_last):
    """Against a full sort: the scale, and the positions and signs the backward scatters to (every block size)."""
    from normzoo.norms.hoffer import topk_stats

    x = sample(shape, torch.float64)
    x[:, :, 0, 0] += torch.linspace(-5, 5, shape[0], dtype=torch.float64)[:, None]  # outliers at one position
    x[:, 0] = x[:, 0].round()  # channel 0: many ties
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    N, Ch, H, W = shape
    stats = topk_stats(x, k)
    z = (x - stats.mean.view(1, -1, 1, 1)).transpose(0, 1).reshape(Ch, -1)
    kk = min(k, z.shape[1])
    torch.testing.assert_close(stats.scale, z.abs().sort(1, descending=True).values[:, :kk].mean(1))
    n_idx, hw_idx = stats.grad.n_idx, stats.grad.hw_idx
    assert n_idx.shape == (Ch, kk) and all(len(set(r.tolist())) == kk for r in n_idx * H * W + hw_idx)
    picked = x[n_idx, torch.arange(Ch)[:, None], hw_idx // W, hw_idx % W] - stats.mean[:, None]
    torch.testing.assert_close(picked.abs().mean(1), stats.scale)
    torch.testing.assert_close(stats.grad.coef, picked.sign() / kk)


# -- batch norm, and lp:2 centered as batch norm -------------------------------------------------------------------
def test_bn_equals_torch_batch_norm_train_and_eval():
    x = sample((8, C, 5, 5))
    module = build("bn")
    rm, rv = torch.zeros(C), torch.ones(C)
    for _ in range(3):
        torch.testing.assert_close(module(x), F.batch_norm(x, rm, rv, module.weight, module.bias, True, 0.1, 1e-5))
    torch.testing.assert_close(module.running_mean, rm)
    torch.testing.assert_close(module.running_var, rv)
    module.eval()
    torch.testing.assert_close(module(x), F.batch_norm(x, rm, rv, module.weight, module.bias, False, 0.1, 1e-5))
    x2 = sample((8, C))
    torch.testing.assert_close(module(x2), F.batch_norm(x2, rm, rv, module.weight, module.bias, False, 0.1, 1e-5))


def test_centered_l2_norm_is_batch_norm_up_to_eps():
    x = sample((16, C, 6, 6))
    bn, lp = build("bn"), create_norm("lp:2,centered=true", C)
    lp.load_state_dict({k: v for k, v in bn.state_dict().items() if k in ("weight", "bias")}, strict=False)
    torch.testing.assert_close(lp(x), bn(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp.running_mean, bn.running_mean)


# -- gradients -----------------------------------------------------------------------------------------------------
def call_with(module, x, weight=None, bias=None):
    """``module(x)`` with the given affine parameters and the RNG reseeded (one fixed draw of any noise)."""
    params = {} if weight is None else {"weight": weight, "bias": bias}
    torch.manual_seed(0)
    return torch.func.functional_call(module, params, (x,))


@pytest.mark.parametrize("spec", ["lp", "lp:1,centered=true", "lp:inf", "l1-bn", "topk-bn:3"])
def test_double_backward(spec):
    """Hessian-vector products (create_graph=True) go through the plain reference."""
    module = build(spec, dtype=torch.float64)
    x = sample((4, C, 2, 2), torch.float64).requires_grad_()
    weight = module.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, w: call_with(module, a, w, module.bias), (x, weight),
                                        eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec", ["lp", "lp:1", "lp:inf", "lp:1,centered=true", "lp:2,centered=true", "lp:3",
                                  "l1-bn", "topk-bn"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fast_backward_matches_reference_float32(spec, channels_last):
    module = build(spec)
    x = sample((32, C, 6, 6))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = sample(x.shape, seed=5)
    results = []
    for fn in (module, lambda a: module.reference_forward(a, module.weight, module.bias)):
        a = x.clone().requires_grad_()
        module.zero_grad()
        fn(a).backward(grad)
        results.append((a.grad, module.weight.grad, module.bias.grad))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=2e-4, atol=2e-4)


def test_input_grad_skipped_when_not_needed():
    module = build("lp:inf")
    module(sample((8, C, 3, 3))).sum().backward()
    assert module.weight.grad is not None and module.bias.grad is not None


# -- the norm contract (normzoo.testing, the kit plugin authors use): every registered norm and the variants -----
test_zoo_passes_the_norm_contract = norm_contract(SPECS)


# The kit's gradcheck projects the Jacobian on random directions; the norms with their own backward (the batch
# scale norms' autograd Function, noisy-bn's redrawn scale) are also compared entry by entry.
@pytest.mark.parametrize("spec", ["lp", "lp:1", "lp:inf,centered=true", "lp:3", "l1-bn", "topk-bn:3",
                                  "noisy-bn:recompute=true"])
def test_own_backward_passes_the_full_gradcheck(spec):
    check_gradcheck(spec, full=True)


@pytest.mark.parametrize("spec", ["lp:2,centered=true", "lp:inf", "l1-bn", "lp:3"])
def test_constant_channel_gives_finite_output_and_gradient(spec):
    module = build(spec)
    x = sample((6, C, 3, 3)).requires_grad_()
    x.data[:, 1] = 0.0  # a dead (all-zero) channel
    out = module(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


# -- noisy batch norm: Algorithm 1's noise ---------------------------------------------------------------------------
def test_noise_only_on_zeros_is_the_additive_noise():
    mu, r_mu = 0.5, 0.1
    module = create_norm(f"noisy-bn:bn=false,mu={mu},r_mu={r_mu}", 8).train()
    out = seeded(module, torch.zeros(64, 8, 8, 8))
    per_channel = out.transpose(0, 1).reshape(8, -1)
    low, high = per_channel.min(1).values, per_channel.max(1).values
    assert (low >= -mu - r_mu).all() and (high <= mu + r_mu).all()
    assert ((high - low) <= 2 * r_mu + 1e-6).all()
    assert ((high - low) >= 0.98 * 2 * r_mu).all()  # 4096 uniforms fill the window
    centres = (low + high) / 2
    assert centres.std() > 0.1  # µ_j differ between channels


def test_noise_on_ones_has_the_right_spread_and_centres():
    sigma, r_mu, r_sigma = 1.25, 0.1, 0.1
    module = create_norm(f"noisy-bn:bn=false,mu=0,sigma={sigma},r_mu={r_mu},r_sigma={r_sigma}", 16).train()
    out = seeded(module, torch.ones(64, 16, 8, 8))
    per_channel = out.transpose(0, 1).reshape(16, -1)
    std = per_channel.std(1)
    torch.testing.assert_close(std, torch.full_like(std, math.sqrt(r_sigma**2 + r_mu**2 / 3)), rtol=0.05, atol=0)
    centres = per_channel.mean(1)  # σ_j + µ_j with µ_j = 0
    assert (centres > 1 - 0.01).all() and (centres < sigma + 0.01).all()
    # with the default shift range the centres are σ_j + µ_j in [1 − mu, sigma + mu]
    module = create_norm("noisy-bn:bn=false", 16).train()
    centres = seeded(module, torch.ones(64, 16, 8, 8)).mean((0, 2, 3))
    assert (centres > 0.5 - 0.01).all() and (centres < 1.75 + 0.01).all() and centres.std() > 0.1


def test_noise_is_fresh_each_step_and_seeded():
    module = create_norm("noisy-bn", C).train()
    x = sample((8, C, 3, 3))
    assert not torch.equal(module(x), module(x))
    torch.testing.assert_close(seeded(module, x, 3), seeded(module, x, 3), rtol=0, atol=0)


def test_noisy_eval_modes():
    x = sample((8, C, 3, 3))
    bn = build("bn")
    for _ in range(2):
        bn(sample((8, C, 3, 3), seed=3))
    bn.eval()
    for spec, expected in [("noisy-bn", bn(x) * 1.125), ("noisy-bn:eval=none", bn(x)),
                           ("noisy-bn:sigma=2", bn(x) * 1.5), ("noisy-bn:bn=false", x * 1.125),
                           ("noisy-bn:bn=false,eval=none", x)]:
        module = create_norm(spec, C)
        module.load_state_dict(bn.state_dict()) if module.bn else None
        torch.testing.assert_close(module.eval()(x), expected, msg=spec)
    before = create_norm("noisy-bn:where=before", C)
    before.load_state_dict(bn.state_dict())
    xhat = F.batch_norm(x, bn.running_mean, bn.running_var, None, None, False, 0.0, 1e-5)
    expected = xhat * 1.125 * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(before.eval()(x), expected)


def test_noisy_without_bn_has_no_parameters():
    module = create_norm("noisy-bn:bn=false", C)
    assert not list(module.parameters()) and not list(module.buffers())
