"""The sharpness probe: Lanczos against the exact spectrum of a small network's full Hessian (float64), warm starts,
the fixed evaluation subset, and the stability thresholds against gradient descent run on quadratics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from normzoo.config import RunConfig
from normzoo.errors import SpecError
from normzoo.norms.base import create_norm
from normzoo.probe import ProbeContext
from normzoo.runner import train
from normzoo_probes.lanczos import lanczos
from normzoo_probes.sharpness import SharpnessProbe, stability_threshold
from test_probes_hessian import full_hessian
from test_probes_landscape import D, Quadratic, context, identical, snapshot


def mlp(norm: str | None = None, seed: int = 0) -> nn.Module:
    """A float64 MLP with 149 parameters (with bn: 173), in train mode."""
    torch.manual_seed(seed)
    middle = [create_norm(norm, 12)] if norm else []
    return nn.Sequential(nn.Linear(5, 12), *middle, nn.Tanh(), nn.Linear(12, 5)).to(D).train()


def data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=gen, dtype=D), torch.randint(0, 5, (n,), generator=gen)


def test_lanczos_finds_the_algebraically_largest_eigenvalues() -> None:
    """A large negative eigenvalue (which power iteration would report) does not hide λ_max."""
    eigenvalues = torch.tensor([-9.0, 4.0, 3.0, 2.5, 1.0] + [0.1 * i for i in range(20)], dtype=D)
    q, _ = torch.linalg.qr(torch.randn(25, 25, generator=torch.Generator().manual_seed(0), dtype=D))
    a = q @ torch.diag(eigenvalues) @ q.T
    result = lanczos(lambda v: a @ v, torch.ones(25, dtype=D), iters=25, top=3, tol=1e-10)
    assert result.converged and result.iterations < 25
    assert result.eigenvalues == pytest.approx([4.0, 3.0, 2.5], rel=1e-9)
    assert float((a @ result.vector - 4.0 * result.vector).norm()) < 1e-6  # the top Ritz vector is an eigenvector


@pytest.mark.parametrize("norm", [None, "bn"])  # bn in train mode: batch statistics inside the Hessian
def test_top_eigenvalues_match_eigvalsh_of_the_full_hessian(norm: str | None) -> None:
    model = mlp(norm)
    x, y = data()
    exact = torch.linalg.eigvalsh(full_hessian(model, x, y)).flip(0)
    values = SharpnessProbe(iters=60, top=3, tol=1e-9).measure(
        context(model, lr=0.1, loss_fn=nn.functional.cross_entropy, inputs=x, targets=y))
    assert values["converged"] and values["iterations"] < 60
    assert values["eigenvalue"] == pytest.approx(float(exact[0]), rel=1e-7)
    assert values["eigenvalues"] == pytest.approx(exact[:3].tolist(), rel=1e-6)
    # SGD with momentum 0.9 (the test context's optimizer): the heavy-ball threshold.
    assert values["threshold"] == pytest.approx(3.8 / 0.1) and values["threshold_formula"] == "(2+2*momentum)/lr"
    assert values["relative"] == pytest.approx(float(exact[0]) / 38.0, rel=1e-7)
    assert (values["lr"], values["momentum"], values["samples"]) == (0.1, 0.9, 24)


def test_warm_start_needs_fewer_iterations() -> None:
    model = mlp("bn")
    x, y = data()
    ctx = context(model, lr=0.1, loss_fn=nn.functional.cross_entropy, inputs=x, targets=y)
    probe = SharpnessProbe(iters=60)
    cold = probe.measure(ctx)
    with torch.no_grad():  # some training's worth of change: the previous top vector is close, not exact
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=D), alpha=1e-2)
    warm = probe.measure(ctx)
    cold_again = SharpnessProbe(iters=60).measure(ctx)
    assert not cold["warm_start"] and warm["warm_start"] and not cold_again["warm_start"]
    assert warm["converged"] and cold_again["converged"]
    assert warm["eigenvalue"] == pytest.approx(cold_again["eigenvalue"], rel=1e-5)
    assert warm["iterations"] <= cold_again["iterations"] - 4  # 8 against 16 products here
    assert not SharpnessProbe(warm=False).measure(ctx)["warm_start"]


def subset_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, probe: SharpnessProbe,
                   chunk: int) -> torch.Tensor:
    """The Hessian of the subset's loss as the probe defines it: Σ_c (n_c/N)·L_c over its chunks."""
    index = probe.subset
    parts = index.tensor_split(math.ceil(len(index) / chunk))
    return sum(full_hessian(model, x[part], y[part]) * (len(part) / len(index)) for part in parts)


@pytest.mark.parametrize("norm", [None, "bn"])
def test_samples_measures_the_fixed_subset_in_chunks(norm: str | None) -> None:
    model = mlp(norm)
    train_x, train_y = data(60)
    batch_x, batch_y = train_x[:8], train_y[:8]
    ctx = context(model, lr=0.1, loss_fn=nn.functional.cross_entropy, inputs=batch_x, targets=batch_y)
    ctx.train_inputs, ctx.train_targets = train_x, train_y
    probe = SharpnessProbe(samples=40, iters=80, tol=1e-9, seed=4)  # chunks of the batch size, 8: five of them
    values = probe.measure(ctx)
    subset = probe.subset.clone()
    assert len(set(subset.tolist())) == 40 and values["samples"] == 40
    exact = float(torch.linalg.eigvalsh(subset_hessian(model, train_x, train_y, probe, chunk=8))[-1])
    assert values["eigenvalue"] == pytest.approx(exact, rel=1e-7)
    if norm is None:  # without batch statistics the chunked loss is the plain mean over the 40 examples
        assert exact == pytest.approx(float(torch.linalg.eigvalsh(
            full_hessian(model, train_x[subset], train_y[subset]))[-1]), rel=1e-10)
    assert values["eigenvalue"] != pytest.approx(
        float(torch.linalg.eigvalsh(full_hessian(model, batch_x, batch_y))[-1]), rel=1e-3)  # not the batch's
    probe.measure(ctx)
    assert torch.equal(probe.subset, subset)  # the same examples at every measurement ...
    again = SharpnessProbe(samples=40, seed=4, iters=2)
    again.measure(ctx)
    assert torch.equal(again.subset, subset)  # ... and in a resumed run (a new probe object, the same seed)


def test_samples_with_dropout_and_bn_leaves_the_run_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), create_norm("bn", 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 5))
    train_x, train_y = data(40)
    ctx = context(model.to(D).train(), lr=0.1, loss_fn=nn.functional.cross_entropy, inputs=train_x[:8],
                  targets=train_y[:8])
    ctx.train_inputs, ctx.train_targets = train_x, train_y
    before = snapshot(ctx)
    values = SharpnessProbe(samples=24, iters=30, tol=1e-8).measure(ctx)
    assert identical(before, snapshot(ctx))
    # Dropout draws replayed at every product: Lanczos sees one symmetric operator and converges.
    assert values["converged"] and math.isfinite(values["eigenvalue"])


def test_samples_without_training_data_is_one_clear_error() -> None:
    model = mlp()
    x, y = data(8)
    ctx = context(model, loss_fn=nn.functional.cross_entropy, inputs=x, targets=y)
    with pytest.raises(SpecError, match=r"sharpness: samples=16 needs the training data") as error:
        SharpnessProbe(samples=16).measure(ctx)
    assert "\n" not in str(error.value)
    ctx.train_inputs, ctx.train_targets = x, y
    with pytest.raises(SpecError, match="exceeds the 8 training examples"):
        SharpnessProbe(samples=16).measure(ctx)


def sgd_run(curvatures: torch.Tensor, steps: int = 3000, **sgd) -> float:
    """‖x‖ after running torch's SGD on L = ½ Σ λ_i x_i² from x = 1."""
    x = nn.Parameter(torch.ones(len(curvatures), dtype=D))
    optimizer = torch.optim.SGD([x], **sgd)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * (curvatures * x * x).sum()).backward()
        optimizer.step()
        if not torch.isfinite(x.detach()).all() or float(x.detach().norm()) > 1e12:
            break
    return float(x.detach().norm())


SETTINGS = [{"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}, {"lr": 0.05, "momentum": 0.5, "dampening": 0.5},
            {"lr": 0.1, "momentum": 0.9, "nesterov": True}]
EXPECTED_THRESHOLDS = [2 / 0.1, 3.8 / 0.1, 3.0 / (0.5 * 0.05), 3.8 / (2.8 * 0.1)]


@pytest.mark.parametrize("sgd,expected", list(zip(SETTINGS, EXPECTED_THRESHOLDS)),
                         ids=["gd", "heavy-ball", "dampened", "nesterov"])
@pytest.mark.parametrize("side", [0.97, 1.03])
def test_gradient_descent_diverges_exactly_when_relative_exceeds_one(sgd: dict, expected: float, side: float) -> None:
    """On L = ½ Σ λ_i x_i² the probe's λ_max is exact; torch's optimizer, run with λ_max just below or just
    above the threshold, converges or diverges as ``relative`` < 1 or > 1 says."""
    threshold, _, note = stability_threshold(torch.optim.SGD([nn.Parameter(torch.zeros(1))], **sgd), sgd["lr"])
    assert threshold == pytest.approx(expected, rel=1e-12) and note is None
    curvatures = torch.tensor([side * threshold, 0.3 * threshold, 0.01 * threshold], dtype=D)
    model = Quadratic(torch.diag(curvatures), torch.ones(3))
    optimizer = torch.optim.SGD(model.parameters(), **sgd)
    ctx = ProbeContext(model, lambda out, y: out, torch.zeros(1, dtype=D), torch.zeros(1, dtype=D), optimizer,
                       sgd["lr"], 0, 1)
    values = SharpnessProbe(iters=3, tol=1e-12).measure(ctx)
    assert values["eigenvalue"] == pytest.approx(side * threshold, rel=1e-12)
    assert values["relative"] == pytest.approx(side, rel=1e-12)
    final = sgd_run(curvatures, **sgd)
    assert (final > 1e6) == (values["relative"] > 1) and (final < 1e-6) == (values["relative"] < 1), final


def test_no_threshold_for_adam_or_a_zero_learning_rate() -> None:
    model = mlp()
    x, y = data(8)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    for optimizer, lr, why in [(adam, 1e-3, "Adam"), (torch.optim.SGD(model.parameters(), lr=0.0), 0.0, "0.0")]:
        ctx = ProbeContext(model, nn.functional.cross_entropy, x, y, optimizer, lr, 0, 1)
        values = SharpnessProbe(iters=5).measure(ctx)
        assert math.isnan(values["threshold"]) and math.isnan(values["relative"]) and why in values["note"]
        assert values["eigenvalue"] > 0 and values["threshold_formula"] == "none"


def test_the_runner_gives_the_probe_the_training_data(tmp_path) -> None:
    config = RunConfig(backbone="vgg11,width=0.0625", norm="bn", dataset="synthetic,n=64,n_test=16,size=32",
                       batch_size=8, lr=0.05, steps=3, log_every=3, device="cpu", out=str(tmp_path), run_name="r",
                       probes=["sharpness:at=0+2,init=false,samples=16,iters=3"])
    train(config, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["type"] == "probe"]
    assert [r["step"] for r in probes] == [0, 2] and all(r["samples"] == 16 for r in probes)
    assert not probes[0]["warm_start"] and probes[1]["warm_start"]
    assert probes[0]["threshold"] == pytest.approx(3.8 / 0.05)  # the runner's SGD: momentum 0.9 by default


@pytest.mark.parametrize("kwargs", [{"iters": 0}, {"top": 0}, {"top": 5, "iters": 4}, {"tol": -1.0},
                                    {"tol": math.inf}, {"samples": -1}, {"chunk": -2}])
def test_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(SpecError, match="sharpness"):
        SharpnessProbe(**kwargs)
