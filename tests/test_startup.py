"""Start-up: listings import no torch, ``normzoo run`` imports only what its run uses, the registry cache.

The import checks run in fresh processes (this one has torch already). Each uses its own cache folder, first
filled by one process, as on a machine after ``pip install`` and one command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import install_fake_distribution

import normzoo
from normzoo.plugins import Plugins, reset_plugins
from normzoo.registry_cache import factory_ref, resolve_ref

LISTINGS = [["--help"], ["plugins"], ["plugins", "--json"], ["norms"], ["norms", "--json"], ["probes"],
            ["probes", "--json"], ["backbones"], ["backbones", "--json"], ["datasets"], ["datasets", "--json"]]


def python(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NORMZOO_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
                                            **env})


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    """A cache folder filled as the first process after an install fills it: here by this one, which has imported
    the plugins already (a process of its own would spend its start-up importing them again)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NORMZOO_CACHE_DIR", str(cache))
        patch.delenv("NORMZOO_NO_CACHE", raising=False)
        assert "bn" in Plugins().registry("norms")
    assert list(cache.glob("registries-*.json"))
    return cache


def test_listings_import_no_torch(warm_cache):
    done = python(f"""
        import json, sys
        from click.testing import CliRunner
        from normzoo.cli import cli
        outputs = {{}}
        for args in {LISTINGS!r}:
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, (args, result.output)
            outputs[" ".join(args)] = result.output
        heavy = sorted(m for m in ("torch", "torchvision", "timm", "numpy", "matplotlib") if m in sys.modules)
        print(json.dumps({{"heavy": heavy, "outputs": outputs}}))
    """, warm_cache)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["heavy"] == []
    norms = {row["name"]: row for row in json.loads(report["outputs"]["norms --json"])}
    assert {"bn", "lp", "timm-evonorm-s0", "mean-bn"} <= set(norms)  # built-ins and plugins, from the cache
    assert norms["lp"]["params"]["p"] == {"type": "float", "default": "2"}
    assert "landscape" in report["outputs"]["probes"] and "vgg11" in report["outputs"]["backbones"]


def test_a_run_imports_only_what_it_uses(warm_cache, tmp_path):
    """Neither torchvision nor timm (a VGG), nor torch._dynamo (no compiling), nor Triton (on the CPU), nor
    report code."""
    done = python(f"""
        import json, sys
        from click.testing import CliRunner
        from normzoo.cli import cli
        result = CliRunner().invoke(cli, ["run", "--backbone", "vgg11,width=0.0625", "--norm", "lp:inf",
                                          "--dataset", "synthetic,n=32,n_test=16", "--batch-size", "16",
                                          "--steps", "1", "--device", "cpu", "--out", {str(tmp_path)!r}, "--quiet"])
        assert result.exit_code == 0, result.output
        import torch, normzoo
        from normzoo.optim import Adam
        from pathlib import Path
        (run,) = [p for p in Path({str(tmp_path)!r}).iterdir() if p.is_dir()]
        model, info = normzoo.load_checkpoint(run / "best.safetensors")  # first built on the meta device
        adam = Adam(model.parameters())
        model(torch.zeros(2, 3, 32, 32)).sum().backward()
        adam.step(), adam.zero_grad(), adam.load_state_dict(adam.state_dict())
        # A probe names its report by import path: neither the probes nor the registry load report code.
        import normzoo_probes.plugin
        import normzoo.norms, normzoo.kernels.ops  # Triton is imported where a kernel is used, on CUDA
        from normzoo.plugins import registry
        assert all(entry.report is None or ":" in entry.report for entry in registry("probes"))
        # torch._dynamo: what every torch.optim method imports on first use (normzoo.optim's do not)
        print(json.dumps(sorted(m for m in sys.modules if m in ("torchvision", "timm", "torch._dynamo", "triton",
                                                                "torch._inductor")
                                or m.startswith(("matplotlib", "normzoo.report", "normzoo_probes.reports")))))
    """, warm_cache)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_a_model_is_built_from_one_parse_of_each_spec(monkeypatch):
    import normzoo.registries

    calls = []
    real = normzoo.registries.split_spec
    monkeypatch.setattr(normzoo.registries, "split_spec", lambda text: calls.append(text) or real(text))
    model = normzoo.build_model("vgg11,width=0.0625", "lp:inf")
    assert len(normzoo.placement.find_norms(model)) == 8
    assert calls == ["vgg11,width=0.0625", "lp:inf"]


def test_public_names_stay_what_they_are_once_every_submodule_is_imported():
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(normzoo.__path__, "normzoo."):
        if info.name != "normzoo.__main__":
            importlib.import_module(info.name)
    for name in normzoo.__all__:
        value = getattr(normzoo, name)
        assert not isinstance(value, type(normzoo)), f"normzoo.{name} is a module, not the public {name}"
    model = normzoo.build_model("vgg11,width=0.0625", "bn")
    assert normzoo.inject(model, "gn:2") is model  # the README's example, after every import
    assert isinstance(normzoo.registry("norms"), normzoo.registries.Registry)


# -- the cache ---------------------------------------------------------------------------------------------------
def test_factories_round_trip_by_import_path():
    from functools import partial

    from normzoo.backbones.vgg import build_vgg
    from normzoo.norms import LpNorm

    assert resolve_ref(factory_ref(LpNorm)) is LpNorm
    back = resolve_ref(factory_ref(partial(build_vgg, "A")))
    assert back.func is build_vgg and back.args == ("A",)
    assert factory_ref(lambda num_features: None) is None


PLUGIN = """
    from torch import nn
    from normzoo import hookimpl

    class Plain(nn.Identity):
        def __init__(self, num_features, *, eps: float = 1e-5, device=None, dtype=None):
            super().__init__()

    @hookimpl
    def register_norms(register):
        register("cached-plain", Plain, summary="importable by name")
        register("twice-bn", Plain, summary="clashes with nothing")
"""


def test_a_valid_cache_spares_every_hook_and_a_changed_plugin_refills_it(site, monkeypatch, tmp_path):
    monkeypatch.setenv("NORMZOO_CACHE_DIR", str(tmp_path / "cache"))
    install_fake_distribution(site, "nz-test-cached", "nz_test_cached", PLUGIN)
    reset_plugins()
    first = Plugins()
    assert "cached-plain" in first.registry("norms")
    (cache_file,) = (tmp_path / "cache").glob("registries-*.json")
    second = Plugins()
    assert second._pm is None  # nothing imported, no hook called
    entry = second.registry("norms").get("cached-plain")
    assert entry.summary == "importable by name" and entry.params[0].name == "eps"
    assert entry.factory.__name__ == "Plain"  # imported now, on use
    (site / "nz_test_cached.py").write_text((site / "nz_test_cached.py").read_text().replace(
        '"importable by name"', '"changed"'))
    os.utime(site / "nz_test_cached.py", ns=(1, 10**18))  # a new modification time, whatever the clock says
    del sys.modules["nz_test_cached"]  # as in the next process
    third = Plugins()
    assert third._fingerprint != second._fingerprint
    assert third.registry("norms").get("cached-plain").summary == "changed"
    assert json.loads(cache_file.read_text())["fingerprint"] == third._fingerprint


def test_a_plugin_with_unnamed_factories_is_called_live(site, monkeypatch, tmp_path):
    monkeypatch.setenv("NORMZOO_CACHE_DIR", str(tmp_path / "cache"))
    install_fake_distribution(site, "nz-test-live", "nz_test_live", """
        from torch import nn
        from normzoo import hookimpl

        @hookimpl
        def register_norms(register):
            register("live-lambda", lambda num_features, *, device=None, dtype=None: nn.Identity(), summary="x")
    """)
    reset_plugins()
    assert "live-lambda" in Plugins().registry("norms")
    again = Plugins()
    assert "live-lambda" in again.registry("norms") and again._pm is not None
    assert again.registry("norms").get("bn").plugin == "normzoo.norms"


def test_plugin_errors_are_reported_again_from_the_cache(site, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("NORMZOO_CACHE_DIR", str(tmp_path / "cache"))
    install_fake_distribution(site, "nz-test-clash", "nz_test_clash", """
        from normzoo import hookimpl
        from normzoo.norms import BatchNorm

        @hookimpl
        def register_norms(register):
            register("bn", BatchNorm, summary="a second bn")
    """)
    reset_plugins()
    Plugins().registry("norms")
    capsys.readouterr()
    cached = Plugins()
    assert "registered by both plugin 'normzoo.norms' and plugin 'nz-test-clash'" in capsys.readouterr().err
    assert cached.info["nz-test-clash"].errors and cached.registry("norms").get("bn").plugin == "normzoo.norms"


def test_no_cache_and_an_unwritable_cache_folder_change_nothing(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("NORMZOO_CACHE_DIR", str(tmp_path / "file"))
    assert "bn" in Plugins().registry("norms")
    monkeypatch.setenv("NORMZOO_NO_CACHE", "1")
    plugins = Plugins()
    assert plugins._cache_file is None and "bn" in plugins.registry("norms")


def test_the_fingerprint_follows_installs_not_bytecode_writes(monkeypatch, tmp_path):
    """A fresh ``uv pip install`` compiles no bytecode: the processes after it write ``__pycache__`` at the
    site-packages root, which must not refill the registries in every one of them."""
    import normzoo.registry_cache as registry_cache

    monkeypatch.setattr(registry_cache.site, "getsitepackages", lambda: [str(tmp_path)])
    monkeypatch.setattr(registry_cache.site, "getusersitepackages", lambda: str(tmp_path / "user"))
    before = registry_cache.fingerprint([], "1")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "six.cpython-311.pyc").write_bytes(b"")
    assert registry_cache.fingerprint([], "1") == before
    (tmp_path / "six-1.17.0.dist-info").mkdir()
    installed = registry_cache.fingerprint([], "1")
    assert installed != before
    (tmp_path / "six-1.17.0.dist-info").rename(tmp_path / "six-1.18.0.dist-info")
    assert registry_cache.fingerprint([], "1") not in (before, installed)
