"""Every hookspec is exercised through an installed plugin (an entry point, as users ship them) and documented
with its exact signature in the README — datasette's rule, enforced by the last test."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch

from normzoo import hookspecs
from normzoo.plugins import get_plugins, registry, reset_plugins

from conftest import install_fake_distribution

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_hook_register_norms():
    """normzoo-example and normzoo-timm are real installed distributions in the development environment."""
    plugins = get_plugins()
    assert plugins.info["example"].source == "entry point normzoo-example"
    assert registry("norms").get("mean-bn").plugin == "example"
    assert registry("norms").get("timm-evonorm-s0").plugin == "timm_norms"
    norm = registry("norms").build("mean-bn:momentum=0.5", 3)
    assert type(norm).__name__ == "MeanOnlyBatchNorm" and norm.momentum == 0.5


def test_hook_register_probes():
    assert get_plugins().info["probes"].source == "entry point normzoo-probes"
    assert registry("probes").get("landscape").plugin == "probes"
    assert registry("probes").get("weight-norm").plugin == "example"
    assert registry("probes").build("weight-norm:every=5").due(10, 100)


def test_hook_register_backbones(site):
    install_fake_distribution(site, "nz-test-mlp", "nz_test_mlp", """
        from torch import nn
        from normzoo import hookimpl

        def tiny_mlp(*, norm_layer, num_classes, in_chans, width: int = 8):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(width), norm_layer(width), nn.ReLU(),
                                 nn.Linear(width, num_classes))

        @hookimpl
        def register_backbones(register):
            register("tiny-mlp", tiny_mlp, summary="a two-layer MLP")
    """)
    reset_plugins()
    from normzoo.models import build_model

    assert registry("backbones").get("tiny-mlp").plugin == "nz-test-mlp"
    model = build_model("tiny-mlp,width=6", "lp:inf", num_classes=3, in_chans=1)
    assert type(model[2]).__name__ == "LpNorm" and model[2].num_features == 6
    assert model(torch.randn(4, 1, 5, 5)).shape == (4, 3)


def test_hook_register_datasets(site):
    install_fake_distribution(site, "nz-test-ramp", "nz_test_ramp", """
        import torch
        from normzoo import hookimpl
        from normzoo.data import Dataset

        def ramp(*, data_dir=None, n: int = 16):
            x = torch.linspace(0, 1, n * 4).reshape(n, 1, 2, 2)
            y = torch.arange(n) % 2
            return Dataset("ramp", x, y, x[:4], y[:4], num_classes=2, input_shape=(1, 2, 2), source="generated")

        @hookimpl
        def register_datasets(register):
            register("ramp", ramp, summary="a deterministic toy set")
    """)
    reset_plugins()
    from normzoo.data import load_dataset

    assert registry("datasets").get("ramp").plugin == "nz-test-ramp"
    data = load_dataset("ramp,n=8")
    assert data.train_x.shape == (8, 1, 2, 2) and data.spec == "ramp,n=8"


def test_hook_register_loggers(site, tmp_path):
    install_fake_distribution(site, "nz-test-list-logger", "nz_test_list_logger", """
        from normzoo import hookimpl
        from normzoo.loggers import Logger

        SEEN = []

        class ListLogger(Logger):
            def __init__(self, *, every: int = 1):
                self.every = every

            def open(self, run_dir, config, step):
                SEEN.append(("open", run_dir.name, config["norm"].split(",")[0], step))

            def log(self, record):
                SEEN.append((record["type"], record["step"]))

            def close(self):
                SEEN.append(("close",))

        @hookimpl
        def register_loggers(register):
            register("list", ListLogger, summary="keeps the records in a list (tests)")
    """)
    reset_plugins()
    from normzoo.config import RunConfig
    from normzoo.runner import train

    assert registry("loggers").get("list").plugin == "nz-test-list-logger"
    train(RunConfig(backbone="vgg11,width=0.0625", dataset="synthetic,n=32,n_test=16", batch_size=16, steps=2,
                    log_every=1, device="cpu", out=str(tmp_path), run_name="r", loggers=["list:every=2"]), quiet=True)
    seen = sys.modules["nz_test_list_logger"].SEEN
    assert seen[0] == ("open", "r", "bn", 0) and seen[-1] == ("close",)
    assert ("train", 1) in seen and ("train", 2) in seen and ("eval", 2) in seen and ("status", 2) in seen


def test_every_hook_has_a_test_and_its_exact_signature_in_the_readme():
    tests = {name for name in dir(sys.modules[__name__]) if name.startswith("test_hook_")}
    for hook in hookspecs.KINDS.values():
        assert f"test_hook_{hook}" in tests, f"hook {hook} has no test_hook_{hook}"
        signature = f"{hook}({', '.join(inspect.signature(getattr(hookspecs, hook)).parameters)})"
        assert signature in README, f"the README does not document {signature}"
