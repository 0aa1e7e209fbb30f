"""The norm contract as checks any registered norm can be run through: a conformance kit for plugin authors.

In a plugin's tests, one line runs every check on the plugin's norms (the norm must be registered, i.e. the
plugin installed, or registered in the test session)::

    from normzoo.testing import norm_contract

    test_batch_renorm_contract = norm_contract(["batch-renorm", "batch-renorm:r_max=2,d_max=3"])

Each check is a plain function of a spec string that raises ``AssertionError`` with a message on failure, so it
also works outside pytest (``check_norm("my-norm")`` runs them all). normzoo's own zoo runs the same checks
(``tests/test_norms.py``). The contract (docs/design.md, "The norm contract"):

- constructor ``Norm(num_features, *, eps, affine, device=None, dtype=None, **params)``, declared ``traits``,
  its own ``reset_parameters()``;
- ``(N, C)`` and ``(N, C, H, W)`` inputs (a 2-D input is a 1×1 image), train and eval mode;
- float32 and bfloat16, channels_last, float64 ``gradcheck`` in train and eval mode;
- eval is deterministic and per-sample; running statistics change in train mode only (and exactly when the
  norm declares ``running_stats``); ``state_dict`` round-trips;
- it trains a step inside ``vgg11`` and inside a timm model;
- with ``sync=true`` (when it declares ``sync``), two processes that each hold half the batch train one step as
  one process on the whole batch does (:func:`check_sync`: forked processes, gloo, DistributedDataParallel).
"""

from __future__ import annotations

import inspect
import os
import re
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from normzoo.norms.base import NormTraits, create_norm, parse_norm, traits_of

C = 4  # channels of the test inputs
Check = Callable[[str], None]


def sample(shape: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    """A fixed, non-centred, non-unit input (so that normalization has something to do)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)


def build(spec: str, num_features: int = C, dtype: torch.dtype = torch.float32, randomize: bool = True) -> nn.Module:
    """The norm with affine parameters moved away from their initial 1 and 0 (so mistakes in them show)."""
    module = create_norm(spec, num_features, dtype=dtype)
    if randomize:
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.uniform_(0.5, 1.5) if name == "weight" else param.uniform_(-0.5, 0.5)
    return module


def seeded(module: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Forward with the global RNG reseeded, so that noisy norms draw the same noise every call."""
    torch.manual_seed(seed)
    return module(x)


def buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers()}


def trained(spec: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The norm after three training batches: non-trivial running estimates for its eval mode."""
    module = build(spec, dtype=dtype)
    with torch.no_grad():
        for seed in range(3):
            seeded(module.train(), sample((8, C, 3, 3), dtype, seed=seed))
    return module


# -- the checks ----------------------------------------------------------------------------------------------------
def check_constructor(spec: str) -> None:
    """``Norm(num_features, *, eps, affine, device=None, dtype=None, **params)``, traits, reset_parameters."""
    from normzoo.plugins import registry

    factory = registry("norms").get(parse_norm(spec).family).factory
    params = list(inspect.signature(factory).parameters.values())
    assert params and params[0].name == "num_features", f"{spec}: the first parameter must be num_features"
    named = {p.name: p for p in params[1:]}
    for p in params[1:]:
        assert p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD), f"{spec}: '{p.name}' must be keyword-only"
    for name in ("eps", "affine", "device", "dtype"):
        assert name in named, f"{spec}: the constructor lacks the keyword '{name}'"
    assert named["device"].default is None and named["dtype"].default is None, f"{spec}: device/dtype default None"
    module = create_norm(spec, 3, dtype=torch.float64)
    assert isinstance(traits_of(module), NormTraits), f"{spec}: traits must be a normzoo.NormTraits"
    assert callable(getattr(module, "reset_parameters", None)), f"{spec}: the norm must own reset_parameters()"
    for tensor in [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]:
        assert tensor.dtype == torch.float64, f"{spec}: dtype= not applied to every parameter and buffer"


def check_shapes(spec: str) -> None:
    """(N, C) and (N, C, H, W) in train and eval mode; a 2-D input behaves as a batch of 1×1 images."""
    module = build(spec)
    for train in (True, False):
        module.train(train)
        x4 = sample((6, C, 3, 5))
        assert seeded(module, x4).shape == x4.shape, f"{spec}: 4-D output shape"
        x2 = sample((10, C))
        out2 = seeded(module, x2)
        assert out2.shape == x2.shape, f"{spec}: 2-D output shape"
        torch.testing.assert_close(out2, seeded(module, x2[:, :, None, None]).reshape(x2.shape),
                                   msg=f"{spec}: (N, C) differs from (N, C, 1, 1)")


def check_running_stats_train_only(spec: str) -> None:
    """Buffers move in train mode (exactly when the traits say running_stats) and never in eval mode."""
    module = build(spec)
    before = buffers(module)
    seeded(module.train(), sample((8, C, 3, 3)))
    after_train = buffers(module)
    seeded(module.eval(), sample((8, C, 3, 3), seed=2))
    for key, value in buffers(module).items():
        assert torch.equal(value, after_train[key]), f"{spec}: buffer '{key}' changed in eval mode"
    changed = any(not torch.equal(before[k], after_train[k]) for k in before)
    assert changed == traits_of(module).running_stats, \
        f"{spec}: running statistics {'changed' if changed else 'did not change'} in train mode but the traits " \
        f"say running_stats={traits_of(module).running_stats}"


def check_eval_deterministic(spec: str) -> None:
    """Eval mode gives the same output twice, and a sample's output does not depend on the rest of the batch."""
    module = trained(spec).eval()
    x = sample((6, C, 3, 3), seed=9)
    out = module(x)
    torch.testing.assert_close(module(x), out, rtol=0, atol=0, msg=f"{spec}: eval is not deterministic")
    torch.testing.assert_close(module(x[:2]), out[:2], msg=f"{spec}: eval output depends on the batch")


def check_state_dict_round_trip(spec: str) -> None:
    module = trained(spec)
    fresh = create_norm(spec, C)
    fresh.load_state_dict(module.state_dict())
    x = sample((5, C, 3, 3), seed=7)
    torch.testing.assert_close(fresh.eval()(x), module.eval()(x), rtol=0, atol=0,
                               msg=f"{spec}: a fresh norm loaded with the state_dict differs")


def check_reset_parameters(spec: str) -> None:
    module = build(spec)
    seeded(module.train(), sample((8, C, 3, 3)))
    module.reset_parameters()
    for (name, a), b in zip(module.state_dict().items(), create_norm(spec, C).state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"{spec}: reset_parameters() leaves '{name}' changed")


def check_channels_last(spec: str) -> None:
    """channels_last input gives the same output and input gradient as contiguous input."""
    module = build(spec)
    x = sample((8, C, 5, 4))
    for train in (True, False):
        module.train(train)
        a, b = x.clone().requires_grad_(), x.to(memory_format=torch.channels_last).requires_grad_()
        out_a, out_b = seeded(module, a), seeded(module, b)
        torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5, msg=f"{spec}: channels_last output")
        grad = sample(x.shape, seed=4)
        out_a.backward(grad)
        out_b.backward(grad)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=f"{spec}: channels_last gradient")


def check_bfloat16(spec: str) -> None:
    """A float32 norm takes bfloat16 input, returns bfloat16 close to the float32 result, and backpropagates."""
    module = build(spec)
    x = sample((16, C, 4, 4))
    for train in (True, False):
        module.train(train)
        ref = seeded(module, x)
        xb = x.bfloat16().requires_grad_()
        out = seeded(module, xb)
        assert out.dtype == torch.bfloat16, f"{spec}: bfloat16 input gave {out.dtype}"
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05, msg=f"{spec}: bfloat16 output")
        out.float().sum().backward()
        assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all(), f"{spec}: bf16 gradient"


def check_gradcheck(spec: str, *, full: bool = False) -> None:
    """float64 gradcheck of the input and affine gradients, in train mode and in eval mode.

    By default in torch's fast mode: the analytic Jacobian is compared with finite differences along random
    directions (uᵀJv), which a wrong gradient fails just the same, about 30× quicker than building the whole
    Jacobian column by column. ``full=True`` compares every entry (what a norm with its own ``backward`` is worth
    once; normzoo's tests do it for the zoo's).

    A norm that computes internally in float32 whatever its input (it sets ``float32_internals = True``; timm's
    EvoNorms do) is checked with a step and tolerances that float32 rounding allows: 1e-3 rather than 1e-6.
    """
    for train in (True, False):
        module = (trained(spec, torch.float64) if not train else build(spec, dtype=torch.float64)).train(train)
        step = 1e-3 if getattr(module, "float32_internals", False) else 1e-6
        x = sample((5, C, 3, 2), torch.float64).requires_grad_()
        affine = {name: getattr(module, name).detach().clone().requires_grad_() for name in ("weight", "bias")
                  if isinstance(getattr(module, name, None), torch.Tensor) and getattr(module, name).requires_grad}

        def call(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
            torch.manual_seed(0)  # one fixed draw of any noise
            return torch.func.functional_call(module, dict(zip(affine, params)), (x,))

        try:
            torch.autograd.gradcheck(call, (x, *affine.values()), eps=step, atol=step,
                                     rtol=1e-3 if step < 1e-4 else 2e-2, fast_mode=not full)
        except GradcheckError as exc:
            raise AssertionError(f"{spec}: gradcheck failed in {'train' if train else 'eval'} mode: "
                                 f"{str(exc).splitlines()[0]}") from exc


def _train_step(backbone: str, spec: str, in_chans: int = 3) -> None:
    from normzoo.placement import find_norms
    from normzoo.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, spec, num_classes=10, in_chans=in_chans)
    if parse_norm(spec).family != "none":
        assert find_norms(model), f"{spec}: no norm layer ended up in {backbone}"
    x, y = sample((4, in_chans, 32, 32)), torch.arange(4) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model.train()(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss), f"{spec}: non-finite loss in {backbone}"
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), f"{spec}: {backbone} did not train"
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all(), f"{spec}: non-finite eval output in {backbone}"


def check_in_vgg11(spec: str) -> None:
    """One SGD step of a (narrow) CIFAR VGG-11 with the norm after every conv, then an eval forward."""
    _train_step("vgg11,width=0.125", spec)


def check_in_timm(spec: str) -> None:
    """One SGD step of timm's ``test_resnet`` with every norm swapped for this one, then an eval forward: timm's own
    small ResNet for tests, with a deep stem, average-pool shortcuts and both block kinds (a fifth of resnet18's
    time, and more places a norm sits in)."""
    _train_step("timm:test_resnet", spec)


# -- sync=true on two processes -------------------------------------------------------------------------------------
SYNC_BATCH, SYNC_WORLD = 8, 2


def sync_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of the sync check (inputs, labels); replica r holds rows r·4 to r·4 + 3."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SYNC_BATCH, 2, 5, 5, generator=generator)
    return x, torch.randint(0, 4, (SYNC_BATCH,), generator=generator)


def sync_step(spec: str, rows: slice, wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> dict[str, torch.Tensor]:
    """One SGD step of a small conv net around the norm on ``sync_batch()[rows]``: everything worth comparing
    (output, loss, input and parameter gradients, the state after the step), by name."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), create_norm(spec, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(3, 4))
    model = wrap(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = sync_batch()
    x = x[rows].clone().requires_grad_()
    torch.manual_seed(2)  # the same noise stream in every process
    out = model(x)
    loss = nn.functional.cross_entropy(out, y[rows])
    loss.backward()
    result = {"out": out.detach(), "loss": loss.detach().reshape(1), "x_grad": x.grad}
    result |= {f"grad.{k}": p.grad for k, p in net.named_parameters()}
    optimizer.step()
    return result | {f"after.{k}": v.detach().clone() for k, v in net.state_dict().items()}


def assert_replicas_equal_one_process(spec: str, parts: Sequence[dict[str, torch.Tensor]],
                                      whole: dict[str, torch.Tensor]) -> None:
    """The replicas' results (``sync_step`` on their rows, under DDP) against one process's on the whole batch.

    Each replica's loss is the mean over its rows and DDP averages parameter gradients over the replicas, so the
    input gradients are the whole batch's times the number of replicas and every replica's parameter gradients and
    state after the step are the whole batch's.
    """
    world = len(parts)
    close = torch.testing.assert_close
    close(torch.cat([p["out"] for p in parts]), whole["out"], rtol=1e-5, atol=1e-5,
          msg=lambda m: f"{spec}: the replicas' outputs are not one process's on the whole batch: {m}")
    close(sum(p["loss"] for p in parts) / world, whole["loss"], msg=lambda m: f"{spec} loss: {m}")
    close(torch.cat([p["x_grad"] for p in parts]) / world, whole["x_grad"], rtol=1e-4, atol=1e-6,
          msg=lambda m: f"{spec} input gradient: {m}")
    for key in whole:
        if key.startswith(("grad.", "after.")):
            for rank, part in enumerate(parts):
                close(part[key], whole[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{spec} rank {rank} {key}: {m}")


def _sync_replica(rank: int, spec: str, folder: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    try:
        torch.set_num_threads(1)  # a forked child must not start the parent's OpenMP pool
        dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=SYNC_WORLD)
        try:
            share = SYNC_BATCH // SYNC_WORLD
            result = sync_step(spec, slice(rank * share, (rank + 1) * share), nn.parallel.DistributedDataParallel)
            save_file({k: v.contiguous() for k, v in result.items()}, f"{folder}/{rank}.safetensors")
        finally:
            dist.destroy_process_group()
    except BaseException:
        Path(f"{folder}/{rank}.error").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def sync_check_skipped(spec: str) -> str | None:
    """Why :func:`check_sync` has nothing to check for ``spec``, or None."""
    import multiprocessing

    import torch.distributed as dist

    from normzoo.plugins import registry

    if "sync" not in {p.name for p in registry("norms").resolve(spec).entry.params}:
        return f"{spec}: the norm declares no sync parameter"
    if not dist.is_available() or "fork" not in multiprocessing.get_all_start_methods():
        return "check_sync needs torch.distributed and the fork start method"
    return None


def check_sync(spec: str) -> None:
    """``sync=true`` on two forked processes (gloo) under DistributedDataParallel, each holding half the batch,
    equals one process on the whole batch; a norm that ignores ``sync`` fails it. Nothing to check (it passes) for
    a norm without a ``sync`` parameter; :func:`norm_contract` reports that case as skipped."""
    import multiprocessing

    from safetensors.torch import load_file

    reason = sync_check_skipped(spec)
    if reason:
        return
    synced = re.sub(r"([,:])sync=\w+", r"\1sync=true", parse_norm(spec).canonical())
    whole = sync_step(synced, slice(None))  # outside a process group sync=true is the plain norm
    with tempfile.TemporaryDirectory() as folder:
        context = multiprocessing.get_context("fork")
        replicas = [context.Process(target=_sync_replica, args=(rank, synced, folder)) for rank in range(SYNC_WORLD)]
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.join(timeout=120)
        errors = [Path(folder, f"{rank}.error") for rank in range(SYNC_WORLD)]
        failed = [e.read_text().strip().splitlines()[-1] for e in errors if e.exists()]
        assert not failed and all(r.exitcode == 0 for r in replicas), \
            f"{synced}: a replica failed: {failed or [r.exitcode for r in replicas]}"
        parts = [load_file(f"{folder}/{rank}.safetensors") for rank in range(SYNC_WORLD)]
    assert_replicas_equal_one_process(synced, parts, whole)


NORM_CHECKS: list[Check] = [check_constructor, check_shapes, check_running_stats_train_only,
                            check_eval_deterministic, check_state_dict_round_trip, check_reset_parameters,
                            check_channels_last, check_bfloat16, check_gradcheck, check_in_vgg11, check_in_timm,
                            check_sync]


def check_norm(spec: str, checks: Sequence[Check] = NORM_CHECKS) -> None:
    """Run every check on one registered norm spec (raises ``AssertionError`` at the first failure)."""
    for check in checks:
        check(spec)


def norm_contract(specs: Sequence[str], checks: Sequence[Check] = NORM_CHECKS) -> Callable[..., None]:
    """A pytest test, parametrized over ``specs`` × ``checks``; assign it to a ``test_*`` name in a test module."""
    import pytest

    cases = [pytest.param(spec, check, id=f"{check.__name__.removeprefix('check_')}[{spec}]")
             for spec in specs for check in checks]

    @pytest.mark.parametrize("spec, check", cases)
    def test_norm_contract(spec: str, check: Check) -> None:
        if check is check_sync and (reason := sync_check_skipped(spec)):
            pytest.skip(reason)
        check(spec)

    return test_norm_contract


__all__ = ["NORM_CHECKS", "check_norm", "norm_contract", *[c.__name__ for c in NORM_CHECKS]]
