"""The example plugin's own tests: the norm contract in one line, the norm's formula, the probe."""

from __future__ import annotations

import math

import torch

from normzoo import create_norm
from normzoo.plugins import get_plugins, registry
from normzoo.probe import ProbeContext
from normzoo.testing import norm_contract, sample

# Shapes, train/eval, float32/bfloat16, channels_last, state_dict, float64 gradcheck, vgg11 and timm's test_resnet.
test_mean_bn_keeps_the_norm_contract = norm_contract(["mean-bn", "mean-bn:momentum=0.5,affine=false"])


def test_the_plugin_is_found_through_its_entry_point():
    info = get_plugins().info["example"]
    assert info.source == "entry point normzoo-example" and info.version == "0.1.0"
    assert info.hooks == ["register_norms", "register_probes"] and not info.errors
    assert registry("norms").get("mean-bn").plugin == "example"
    assert registry("probes").get("weight-norm").plugin == "example"


def test_mean_bn_subtracts_the_batch_mean_and_tracks_it():
    norm = create_norm("mean-bn:momentum=0.5", 3, dtype=torch.float64)
    x = sample((8, 3, 4, 4), torch.float64)
    mean = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(norm.train()(x), x - mean.view(1, 3, 1, 1))
    torch.testing.assert_close(norm.running_mean, 0.5 * mean)
    torch.testing.assert_close(norm.eval()(x), x - 0.5 * mean.view(1, 3, 1, 1))


def test_weight_norm_probe_reads_every_weight():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    probe = registry("probes").build("weight-norm:every=10")
    context = ProbeContext(model, torch.nn.functional.cross_entropy, torch.zeros(1, 1, 4, 4), torch.zeros(1),
                           torch.optim.SGD(model.parameters(), lr=0.1), 0.1, 0, 100)
    values = probe.measure(context)
    assert values["layers"] == ["0", "2"]
    assert values["weight_norm"] == [float(model[0].weight.detach().norm()), float(model[2].weight.detach().norm())]
    assert values["total"] == math.hypot(*values["weight_norm"])
    assert probe.due(20, 100) and not probe.due(21, 100)


def test_the_probe_has_its_own_report():
    from normzoo.probe_report import report_for

    report = report_for("weight-norm")
    assert type(report).__name__ == "WeightNormReport"
    records = [{"step": s, "weight_norm": [1.0, 2.0], "total": t} for s, t in ((0, 1.0), (3, 3.0), (6, 4.0))]
    assert report.summarize(records, {})["weight_norm_total_median"] == 3.0
    assert [column.key for column in report.columns] == ["weight_norm_total_median"]
