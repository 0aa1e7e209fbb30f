"""normzoo's Triton kernels (``normzoo.kernels``) on CPU tensors through Triton's interpreter, against the eager
implementation in float64.

    TRITON_INTERPRET=1 uv run pytest tests/test_kernels_interpreted.py -p no:xdist

The interpreter runs the kernels' own code (program by program, in numpy), so these tests check what a GPU would
compute — forward, backward (dx, dγ, dβ) and running statistics, float32 and bfloat16, NCHW and channels_last,
tiles and splits that do not divide the shapes, C = 1, N·H·W = 1, large top-k, synced statistics over two
processes, the noise's distribution, the custom ops' registration (``torch.library.opcheck``) and the modules'
CUDA code path under ``torch.compile``.

TRITON_INTERPRET=1 must be set before anything imports Triton (Triton decides at ``@triton.jit`` time, its own
library functions included, whether a function is interpreted). ``tests/conftest.py`` sets it on a machine without
CUDA, so there these tests run with the rest of the suite; where CUDA is present, or Triton was imported first,
they skip in the session and ``tests/test_kernels.py`` runs this file in a fresh process instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from normzoo import kernels
from normzoo.kernels import ops, tiling
from normzoo.norms.base import create_norm
from normzoo.testing import build, sample

pytestmark = pytest.mark.skipif(not kernels.TRITON_INSTALLED, reason="Triton is not installed")

SCALE_SPECS = ["lp", "lp:2,centered=true", "lp:1", "lp:1,centered=true", "l1-bn", "lp:3", "lp:1.5,centered=true",
               "lp:inf", "lp:inf,centered=true", "topk-bn:3"]
NCHW, NHWC = torch.contiguous_format, torch.channels_last
# shape, dtype, layout, tiling overrides (tiles and splits that do not divide the rows, several channel blocks)
CASES = {
    "f32-nchw-splits": ((3, 4, 3, 2), torch.float32, NCHW, {"block_r": 4, "splits": 3}),
    "bf16-nhwc-splits": ((3, 4, 3, 2), torch.bfloat16, NHWC, {"block_r": 4, "block_c": 2, "splits": 2}),
}
EDGE_CASES = {
    "C=1": ((7, 1, 3, 3), torch.float32, NCHW, {"block_r": 16}),
    "NHW=1": ((1, 4, 1, 1), torch.float32, NCHW, {}),
    "2d": ((9, 4), torch.float32, NCHW, {"block_r": 4}),
}


INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"  # before this module could import Triton


@pytest.fixture(scope="module")
def interpreter():
    """Triton's interpreter for the kernels, which needs TRITON_INTERPRET=1 from before Triton's first import, made
    faster (:func:`faster_interpreter`, whose way back to the unchanged interpreter it yields)."""
    if not INTERPRET_AT_IMPORT:
        pytest.skip("needs TRITON_INTERPRET=1 before Triton is imported: tests/test_kernels.py runs this file in a "
                    "fresh process with it")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from normzoo.kernels import scale_norm

    if not all(isinstance(f, InterpretedFunction) for f in (scale_norm.normalize_kernel, tl.rand4x)):
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set")
    with faster_interpreter() as unchanged:
        yield unchanged


@contextlib.contextmanager
def faster_interpreter() -> Iterator[Callable[[], contextlib.AbstractContextManager[None]]]:
    """Triton's interpreter without two costs that change nothing it computes (bit for bit; about 2.5 times faster).
    Yields a function whose context manager runs its block with the interpreter as Triton ships it.

    - Every integer +, - and * is checked for overflow by redoing it in int64 and comparing, but with ``debug`` off
      the assert that would report an overflow is dropped, as in a GPU build: the check's result is thrown away.
    - Each call of a ``@triton.jit`` helper re-patches ``triton.language`` for the interpreter, scanning every member
      of several namespaces for the builtins to wrap, although the kernel's launch has already wrapped them all. Here
      a launch looks only at the names that were builtins at the first scan, and a helper's call at one of them.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    scan = interpreter._patch_builtin
    builtins: dict[int, list[str]] = {}

    def patch_builtins(namespace, builder, scope) -> None:
        names = builtins.get(id(namespace))
        if names is None:
            names = builtins[id(namespace)] = [name for name in dir(namespace)
                                               if tl.core.is_builtin(getattr(namespace, name, None))]
        elif names and not tl.core.is_builtin(getattr(namespace, names[0])):
            return  # a helper's call inside a kernel: the launch wrapped them all, together
        for name in names:
            member = getattr(namespace, name)
            if tl.core.is_builtin(member):
                interpreter._patch_attr(namespace, name, member, builder, scope)

    @contextlib.contextmanager
    def using(chosen_options, chosen_scan) -> Iterator[None]:
        before = interpreter.interpreter_builder.options, interpreter._patch_builtin
        interpreter.interpreter_builder.options, interpreter._patch_builtin = chosen_options, chosen_scan
        try:
            yield
        finally:
            interpreter.interpreter_builder.options, interpreter._patch_builtin = before

    faster = options if options.debug else dataclasses.replace(options, sanitize_overflow=False)
    with using(faster, patch_builtins):
        yield lambda: using(options, scan)


def norm(spec: str, channels: int = 4, dtype: torch.dtype = torch.float32):
    """The norm with the same randomized affine parameters every time."""
    torch.manual_seed(1234)
    return build(spec, num_features=channels, dtype=dtype)


def train_step(spec: str, x: torch.Tensor, *, triton: bool, seed: int = 0,
               grad: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One train-mode forward and backward of the norm, through the kernels or the eager path; what to compare.

    The eager reference runs in float64 (``reference``): with x's values, it is what the kernels should compute.
    """
    module = norm(spec, x.shape[1]).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    x = x.detach().clone().requires_grad_()
    grad = sample(x.shape, x.dtype, seed=5) if grad is None else grad
    grad = grad.contiguous(memory_format=_layout(x))
    with kernels.interpreting() if triton else contextlib.nullcontext():
        torch.manual_seed(seed)
        out = module(x)
        out.backward(grad)
    result = {"out": out, "x.grad": x.grad}
    result |= {f"{name}.grad": p.grad for name, p in module.named_parameters()}
    return result | {name: b for name, b in module.named_buffers() if b.is_floating_point()}


def reference(spec: str, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The eager path in float64 on x's values: what the kernels should compute, up to float32 rounding."""
    return train_step(spec, x.double(), triton=False, seed=seed)


def assert_same(got: dict, expected: dict, dtype: torch.dtype, what: str) -> None:
    assert got.keys() == expected.keys()
    assert got["out"].dtype == got["x.grad"].dtype == dtype, f"{what}: output or gradient dtype"
    tol = {"rtol": 2e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 2e-5}
    for key in expected:
        torch.testing.assert_close(got[key].double(), expected[key].double(), **tol,
                                   msg=lambda m: f"{what} {key}: {m}")


def _layout(x: torch.Tensor) -> torch.memory_format:
    return NHWC if x.dim() == 4 and x.is_contiguous(memory_format=NHWC) and not x.is_contiguous() else NCHW


def _input(shape, dtype, layout) -> torch.Tensor:
    x = sample(shape, dtype)
    return x.contiguous(memory_format=layout) if len(shape) == 4 else x


# bfloat16 in channels_last changes the loads, stores and tiles, not the statistic: one spec per statistic (p = 1, 2,
# a general p, ∞ and top-k), centered and not, rather than all of them again.
BF16_SPECS = ["lp:2,centered=true", "lp:1", "lp:1.5,centered=true", "lp:inf", "topk-bn:3"]


# -- the batch scale norms -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,case", [(spec, "f32-nchw-splits") for spec in SCALE_SPECS] +
                         [(spec, "bf16-nhwc-splits") for spec in BF16_SPECS])
def test_scale_norm_kernels_match_the_eager_path(interpreter, spec, case):
    shape, dtype, layout, sizes = CASES[case]
    x = _input(shape, dtype, layout)
    with tiling.overrides(**sizes):
        got = train_step(spec, x, triton=True)
    assert got["out"].is_contiguous(memory_format=layout), "the output keeps the input's layout"
    assert_same(got, reference(spec, x), dtype, f"{spec} {case}")


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("spec", ["lp:2,centered=true", "lp:1", "l1-bn", "lp:3", "lp:inf", "topk-bn:3"])
def test_scale_norm_kernels_on_edge_shapes(interpreter, spec, case):
    shape, dtype, layout, sizes = EDGE_CASES[case]
    x = _input(shape, dtype, layout)
    with tiling.overrides(**sizes):
        got = train_step(spec, x, triton=True)
    assert_same(got, reference(spec, x), dtype, f"{spec} {case}")


@pytest.mark.parametrize("k", [5, 17, 18, 19, 500])
def test_topk_kernel_with_k_near_and_above_the_values_per_channel(interpreter, k):
    """18 values per channel: k below, at and above it (capped), and groups of 1 and 2 rows."""
    x = _input((3, 4, 2, 3), torch.float32, NCHW)
    assert_same(train_step(f"topk-bn:{k}", x, triton=True), reference(f"topk-bn:{k}", x), torch.float32,
                f"topk-bn:{k}")


def test_topk_kernel_with_ties_takes_the_exact_top_k_mean(interpreter):
    """Integer-valued channels tie everywhere: the scale is still the mean of the k largest |x − µ|, and the
    parameter gradients (which do not depend on how ties share the input gradient) are the eager ones."""
    x = (sample((16, 4, 3, 3)) * 3).round().bfloat16()
    x[:, 1] = 2.0  # a constant channel: every value ties at |x − µ| = 0
    got, expected = train_step("topk-bn:7", x, triton=True), reference("topk-bn:7", x)
    z = (x.float() - x.float().mean((0, 2, 3), keepdim=True)).transpose(0, 1).reshape(4, -1).abs()
    top = z.sort(1, descending=True).values[:, :7].mean(1)
    torch.testing.assert_close(got["running_scale"], 0.9 + 0.1 * top)
    for key in ("out", "weight.grad", "bias.grad", "running_mean", "running_scale"):
        torch.testing.assert_close(got[key].float(), expected[key].float(), rtol=2e-2, atol=3e-2)
    assert torch.isfinite(got["x.grad"].float()).all()


def test_hessian_vector_product_through_the_kernel_op(interpreter):
    """create_graph=True through the custom op (the Hessian probe's double backward) equals the eager path's."""
    x = sample((6, 4, 3, 3)).requires_grad_()
    v = sample((6, 4, 3, 3), seed=3)
    results = []
    for triton in (True, False):
        module = norm("lp:inf")
        with kernels.interpreting() if triton else contextlib.nullcontext():
            out = module(x)
            (g,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)
            (hv,) = torch.autograd.grad(g, x, v)
        results.append((g.detach(), hv))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_faster_interpreter_computes_the_same_bits(interpreter):
    """What ``faster_interpreter`` leaves out changes no bit: noisy-bn's kernels (integer hashing for the noise,
    helper calls, split reductions) forward and backward, with the interpreter as Triton ships it and as here."""
    x = sample((2, 4, 3, 2))
    with tiling.overrides(block_r=4, splits=2):
        faster = train_step("noisy-bn", x, triton=True, seed=3)
        with interpreter():
            unchanged = train_step("noisy-bn", x, triton=True, seed=3)
    for key in unchanged:
        torch.testing.assert_close(faster[key], unchanged[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


def test_eager_fallback_for_what_the_kernels_do_not_take(interpreter):
    """float64 and layouts whose H and W do not merge take the eager implementation inside the op."""
    with kernels.interpreting():
        assert ops.kernels_take(sample((4, 3, 2, 2)))
        assert not ops.kernels_take(sample((4, 3, 2, 2), torch.float64))
        assert not ops.kernels_take(sample((4, 3, 4, 6)).transpose(2, 3))
        module = norm("lp:3", dtype=torch.float64)
        x = sample((5, 4, 3, 2), torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(lambda a: module(a), (x,), eps=1e-6, atol=1e-5)


# -- synced statistics: two processes, gloo, the interpreter ------------------------------------------------------
# One of each synced path: a centered power mean, the uncentered max, top-k (eager), the noise before the norm.
SYNCED = ["lp:2,centered=true,sync=true", "lp:inf,sync=true", "topk-bn:3,sync=true", "noisy-bn:where=before,sync=true"]
WORLD, BATCH = 2, 6


def _whole_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The batch and the upstream gradient of its output."""
    return sample((BATCH, 4, 3, 2), seed=11), sample((BATCH, 4, 3, 2), seed=12)


def _replica(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        share = BATCH // WORLD
        x, grad = (t[rank * share:(rank + 1) * share] for t in _whole_batch())
        for i, spec in enumerate(SYNCED):
            with tiling.overrides(block_r=4, splits=2):
                result = train_step(spec, x, triton=True, seed=2, grad=grad)
            save_file({k: v.detach().contiguous() for k, v in result.items()}, f"{out_dir}/{i}-{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, interpreter) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    """The replicas' results (a folder of files), and one process's on the whole batch for each spec: computed
    first, so that the replicas, forked after, start with the interpreter's kernels rewritten and imports made."""
    x, grad = _whole_batch()
    wholes = [train_step(spec.replace(",sync=true", "").replace(":sync=true", ""), x, triton=True, seed=2, grad=grad)
              for spec in SYNCED]  # noisy-bn: the same seed, hence the same noise
    out = tmp_path_factory.mktemp("kernel-replicas")
    mp.start_processes(_replica, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="fork")
    return out, wholes


@pytest.mark.slow
@pytest.mark.parametrize("index,spec", list(enumerate(SYNCED)), ids=SYNCED)
def test_synced_kernels_equal_one_process_on_the_whole_batch(replicas, index, spec):
    """Each replica normalizes its half with the statistics of the whole batch (an all-gather of per-channel
    partials between the statistics and normalize passes, and of the sums in the backward): outputs, input
    gradients and running statistics equal one process's on the whole batch; the replicas' parameter gradients
    add up to its (each replica's is its own share, as with SyncBatchNorm). topk-bn takes the eager synced path."""
    folder, wholes = replicas
    whole = wholes[index]
    parts = [load_file(folder / f"{index}-{rank}.safetensors") for rank in range(WORLD)]
    for key in ("out", "x.grad"):
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), whole[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{spec} {key}: {m}")
    for key in whole:
        if key.endswith(".grad") and key != "x.grad":
            torch.testing.assert_close(sum(p[key] for p in parts), whole[key], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{spec} {key}: {m}")
        elif not key.endswith(".grad") and key != "out":
            for part in parts:
                torch.testing.assert_close(part[key], whole[key], msg=lambda m: f"{spec} {key}: {m}")


# -- noisy-bn: Algorithm 1's noise from Philox ------------------------------------------------------------------------
def draws(x: torch.Tensor, seed: int, row0: int = 0, mu=0.5, sigma=1.25, r_mu=0.1, r_sigma=0.1):
    from normzoo.kernels.noise import channel_noise

    _, m, s = channel_noise(x, torch.tensor([seed]), row0, mu, sigma, r_mu, r_sigma, draws=True)
    return m, s


def test_kernel_noise_has_algorithm_1_distribution(interpreter):
    """Per channel j: µ_j ~ U(−mu, mu), σ_j ~ U(1, sigma); per element m ~ U(µ_j ± r_mu), s ~ N(σ_j, r_sigma)."""
    mu, sigma, r_mu, r_sigma = 0.5, 2.0, 0.1, 0.2
    C, n = 32, 4096
    with tiling.overrides(block_r=2048, splits=1):
        m, s = draws(torch.zeros(16, C, 16, 16), seed=7, mu=mu, sigma=sigma, r_mu=r_mu, r_sigma=r_sigma)
    m, s = m.transpose(0, 1).reshape(C, -1), s.transpose(0, 1).reshape(C, -1)  # n values per channel
    low, high = m.min(1).values, m.max(1).values
    mu_c = (low + high) / 2
    assert ((high - low) <= 2 * r_mu + 1e-6).all() and ((high - low) >= 0.99 * 2 * r_mu).all()
    torch.testing.assert_close(m.mean(1), mu_c, rtol=0, atol=4 * r_mu / math.sqrt(3 * n))
    torch.testing.assert_close(m.std(1), torch.full((C,), r_mu / math.sqrt(3)), rtol=0.05, atol=0)
    assert (mu_c.abs() <= mu).all() and mu_c.std() > 0.15  # U(−0.5, 0.5): sd 0.29
    sigma_c = s.mean(1)
    assert (sigma_c > 1 - 0.02).all() and (sigma_c < sigma + 0.02).all() and sigma_c.std() > 0.15
    torch.testing.assert_close(s.std(1), torch.full((C,), r_sigma), rtol=0.05, atol=0)
    z = (s - sigma_c[:, None]) / r_sigma  # standard normal: its tails as well as its spread
    assert abs(float((z.abs() > 1.96).float().mean()) - 0.05) < 0.01
    u = m - m.mean(1, keepdim=True)  # m and s of one element are independent draws
    assert abs(float(torch.corrcoef(torch.stack([u.flatten(), z.flatten()]))[0, 1])) < 0.01


def test_kernel_noise_is_a_function_of_seed_and_logical_position(interpreter):
    x = torch.zeros(6, 3, 4, 5)
    m, s = draws(x, seed=3)
    m2, s2 = draws(x, seed=3)
    assert torch.equal(m, m2) and torch.equal(s, s2)
    assert not torch.equal(draws(x, seed=4)[0], m)
    m_cl, s_cl = draws(x.contiguous(memory_format=NHWC), seed=3)  # same logical (n, c, h, w), same noise
    assert torch.equal(m_cl, m) and torch.equal(s_cl, s)
    m_rows, s_rows = draws(x[3:], seed=3, row0=3)  # a replica holding rows 3..5 of the global batch
    assert torch.equal(m_rows, m[3:]) and torch.equal(s_rows, s[3:])


def noisy_formula(module, x: torch.Tensor, params: dict[str, torch.Tensor], m: torch.Tensor,
                  s: torch.Tensor) -> torch.Tensor:
    """noisy-bn's output from its definition, given the noise draws and the affine parameters, in float64."""
    m, s = m.double(), s.double()
    if not module.bn:
        return s * x + m
    xhat = F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
    gamma, beta = params["weight"].view(1, -1, 1, 1), params["bias"].view(1, -1, 1, 1)
    if module.where == "before":
        return gamma * (s * xhat + m) + beta
    return s * (gamma * xhat + beta) + m


@pytest.mark.parametrize("layout,dtype", [(NCHW, torch.float32), (NHWC, torch.bfloat16)], ids=["f32", "bf16-nhwc"])
@pytest.mark.parametrize("spec", ["noisy-bn", "noisy-bn:where=before", "noisy-bn:bn=false"])
def test_noisy_kernels_match_the_formula_given_the_same_draws(interpreter, spec, layout, dtype):
    """Forward, input and parameter gradients of the fused kernels against autograd of the definition with the
    kernels' own draws; running statistics against torch's batch norm."""
    x = _input((3, 4, 3, 2), dtype, layout)
    with tiling.overrides(block_r=4, splits=2):
        got = train_step(spec, x, triton=True, seed=9)
        torch.manual_seed(9)
        m, s = draws(x, int(ops.noise_seed(x.device)))  # the layer's one draw from the generator, and its noise
    module = norm(spec)
    a = x.detach().double().requires_grad_()
    params = {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}
    expected = noisy_formula(module, a, params, m, s)
    expected.backward(sample(x.shape, x.dtype, seed=5).double())
    tol = {"rtol": 2e-2, "atol": 3e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 2e-5}
    torch.testing.assert_close(got["out"].double(), expected.detach(), **tol)
    torch.testing.assert_close(got["x.grad"].double(), a.grad, **tol)
    for name, p in params.items():
        torch.testing.assert_close(got[f"{name}.grad"].double(), p.grad, rtol=1e-3, atol=1e-3)
    if module.bn:
        bn = torch.nn.BatchNorm2d(4)
        bn(x.float())
        torch.testing.assert_close(got["running_mean"], bn.running_mean, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got["running_var"], bn.running_var, rtol=1e-3, atol=1e-3)


def saved_activation_tensors(module, x: torch.Tensor, *, triton: bool) -> int:
    """How many tensors of x's size the autograd graph of ``module(x)`` keeps for the backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with kernels.interpreting() if triton else contextlib.nullcontext():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x.requires_grad_())
    return sum(size == x.numel() for size in sizes)


def test_noisy_kernels_keep_no_noise_for_the_backward(interpreter):
    """The fused noisy-bn keeps only its input for the backward, like bn; the eager path also keeps s."""
    x = sample((8, 4, 3, 3))
    assert saved_activation_tensors(create_norm("noisy-bn", 4), x, triton=True) == 1
    assert saved_activation_tensors(create_norm("bn", 4), x, triton=False) == 1
    assert saved_activation_tensors(create_norm("noisy-bn", 4), x, triton=False) == 2


def test_eager_recompute_redraws_the_same_noise():
    """noisy-bn:recompute=true (the eager path's option) gives the same output and gradients as the default and
    keeps the generator state instead of s."""
    x = sample((8, 4, 3, 3))
    results = [train_step(spec, x, triton=False, seed=4) for spec in ("noisy-bn", "noisy-bn:recompute=true")]
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=0, atol=0, msg=key)
    assert saved_activation_tensors(create_norm("noisy-bn:recompute=true", 4), x, triton=False) == 1


# -- the custom ops: registration, and the modules' CUDA code path under torch.compile ------------------------------
@pytest.mark.parametrize("op,args", [
    ("batch_scale_norm", ("power", math.inf, False, 1.0, 1, 1e-5, False)),
    ("batch_scale_norm", ("topk", math.inf, True, 1.0, 3, 1e-5, False)),
    ("noisy_batch_norm", (0, 0.5, 1.25, 0.1, 0.1, True, 1e-5, False)),
    ("channel_noise", (0, 0.5, 1.25, 0.1, 0.1, False)),
], ids=["lp:inf", "topk-bn", "noisy-bn", "noise"])
def test_custom_ops_pass_torch_library_opcheck(interpreter, op, args):
    """Schema, autograd registration, fake (meta) implementation and AOT tracing of each op agree with its real
    implementation, the Triton kernels (``torch.library.opcheck``)."""
    x = sample((5, 4, 3, 2)).contiguous(memory_format=NHWC).requires_grad_()
    weight, bias = torch.rand(4, requires_grad=True), torch.rand(4, requires_grad=True)
    seed = torch.tensor([5])
    inputs = {"batch_scale_norm": (x, weight, bias), "noisy_batch_norm": (x, weight, bias, seed),
              "channel_noise": (x, seed)}[op]
    with kernels.interpreting():
        results = torch.library.opcheck(getattr(torch.ops.normzoo, op).default, inputs + args)
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("spec", ["lp:inf", "noisy-bn", "noisy-bn:bn=false"])
def test_compiled_model_traces_the_kernel_path(interpreter, spec):
    """The modules' CUDA code path (the ops, the seed draw, the running-statistics update) under
    ``torch.compile(fullgraph=True)``, run on CPU through the interpreter."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), norm(spec), torch.nn.ReLU())
    x = sample((4, 3, 5, 5))
    with kernels.interpreting():
        torch.compile(model, backend="aot_eager", fullgraph=True)(x).sum().backward()
        compiled_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).sum().backward()
    torch._dynamo.reset()
    assert all(torch.isfinite(g).all() for g in compiled_grads)
    if spec == "lp:inf":  # no noise: the compiled graph computes what eager does
        for got, p in zip(compiled_grads, model.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-5)
