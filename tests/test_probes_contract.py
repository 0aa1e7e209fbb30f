"""Every registered probe: found through the entry point, leaves the run bit-identical, logs through the runner."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from normzoo import build_model
from normzoo.cli import cli
from normzoo.config import RunConfig
from normzoo.plugins import get_plugins, registry
from normzoo.probe import ProbeContext
from normzoo.runner import train

EXPECTED = {"ics", "landscape", "activations", "grad-norms", "depth-scaling", "step-loss", "hessian", "sharpness",
            "effective-lr"}
# Small settings so that every probe runs in well under a second on a tiny VGG.
SMALL = {"landscape": "landscape:steps=3,view=both", "hessian": "hessian:iters=3,trace_samples=2",
         "step-loss": "step-loss:steps=3", "sharpness": "sharpness:iters=3,top=2"}


def test_probes_come_from_the_normzoo_probes_distribution():
    entries = {entry.name: entry for entry in registry("probes")}
    assert EXPECTED <= set(entries)
    assert {entries[name].plugin for name in EXPECTED} == {"probes"}
    plugin = get_plugins().info["probes"]
    assert plugin.source == "entry point normzoo-probes" and not plugin.errors


def snapshot(model, optimizer):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "opt": [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in optimizer.state.values()],
        "rng": torch.get_rng_state(),
    }


def assert_identical(before, after):
    for key in ("params", "buffers"):
        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key])), key
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before["grads"], after["grads"]))
    assert before["modes"] == after["modes"]
    assert len(before["opt"]) == len(after["opt"])
    for a, b in zip(before["opt"], after["opt"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                             for k in a)
    assert torch.equal(before["rng"], after["rng"])


def json_clean(value):
    """Every logged value is plain JSON (numbers, strings, lists, dicts), finite where numeric."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and json_clean(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(json_clean(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (bool, int, str))


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("norm", ["bn", "none"])
def test_probe_leaves_the_run_bit_identical(name, norm):
    torch.manual_seed(0)
    model = build_model("vgg11,width=0.0625", norm=norm, num_classes=4, in_chans=3).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    loss_fn = torch.nn.functional.cross_entropy
    loss_fn(model(x), y).backward()  # a populated momentum buffer and leftover gradients, as mid-training
    optimizer.step()
    probe = registry("probes").build(SMALL.get(name, name))
    before = snapshot(model, optimizer)
    values = probe.measure(ProbeContext(model, loss_fn, x, y, optimizer, 0.05, 10, 100))
    assert_identical(before, snapshot(model, optimizer))
    assert values and json_clean(values), values
    json.dumps(values)


def test_run_with_probes_logs_tagged_records_and_times_them_apart(tmp_path):
    config = RunConfig(backbone="vgg11,width=0.0625", norm="bn", dataset="synthetic,n=64,n_test=16,size=32",
                       batch_size=8, lr=0.05, steps=6, log_every=3, device="cpu", out=str(tmp_path), run_name="r",
                       probes=["landscape:every=2,steps=2", "grad-norms:at=5,init=false"])
    result = train(config, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    probes = [(r["probe"], r["step"]) for r in records if r["type"] == "probe"]
    assert probes == [("landscape", 0), ("landscape", 2), ("landscape", 4), ("grad-norms", 5)]
    assert all(r["batch_size"] == 8 and r["mode"] == "train" and r["seconds"] > 0
               for r in records if r["type"] == "probe")
    assert result.summary["probe_time_s"] > 0
    assert result.summary["train_time_s"] > 0


def test_probes_listing_shows_parameters():
    out = CliRunner().invoke(cli, ["probes", "--json"])
    assert out.exit_code == 0, out.output
    listed = {row["name"]: row for row in json.loads(out.output)}
    assert EXPECTED <= set(listed)
    params = set(listed["landscape"]["params"])
    assert {"steps", "every", "at", "init", "log"} <= params


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_probe_spec_canonical_form_round_trips(name):
    probes = registry("probes")
    spec = probes.parse(f"{name}:every=7")
    assert probes.parse(spec.canonical()) == spec
    assert probes.build(spec.canonical()).every == 7


def test_bad_probe_spec_is_one_line(tmp_path):
    out = CliRunner().invoke(cli, ["run", "--probe", "landscap:every=2", "--dataset", "synthetic", "--steps", "1",
                                   "--out", str(tmp_path)])
    assert out.exit_code == 2
    assert "landscape" in out.output and "Traceback" not in out.output


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    lambda params: torch.optim.Adam(params, lr=1e-3),  # tensor `step` counters next to the moments
], ids=["sgd", "adam"])
def test_preserved_state_undoes_in_place_changes(make_optimizer):
    """The fused snapshot restores gradients accumulated in place, an optimizer step (in-place moments, counters),
    running statistics, a hand-edited parameter, train/eval modes and the RNG."""
    from normzoo.probe import preserved_state

    torch.manual_seed(0)
    model = build_model("vgg11,width=0.0625", norm="bn", num_classes=4, in_chans=3).train()
    optimizer = make_optimizer(model.parameters())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    loss_fn = torch.nn.functional.cross_entropy
    loss_fn(model(x), y).backward()
    optimizer.step()
    model.classifier.weight.grad = None  # a parameter without a gradient must stay without one
    before = snapshot(model, optimizer)
    with preserved_state(model, optimizer):
        loss_fn(model(x), y).backward()  # accumulates into the existing .grad tensors in place
        optimizer.step()
        with torch.no_grad():
            model.features[0].weight.mul_(3.0)
        model.eval()
        torch.randn(5)
    assert_identical(before, snapshot(model, optimizer))
    assert model.classifier.weight.grad is None
