"""The plugin system: built-ins through the hooks, guarded loading, duplicates, strict mode, selection."""

from __future__ import annotations

import sys

import pytest
from torch import nn

from normzoo import hookimpl
from normzoo.errors import PluginError
from normzoo.plugins import get_plugins, reset_plugins

from conftest import install_fake_distribution


class OneNorm:
    """An inline plugin registering one norm, the way tests in llm/datasette do it."""

    @hookimpl
    def register_norms(self, register):
        register("ident", IdentNorm, summary="identity for tests")


class IdentNorm(nn.Identity):
    def __init__(self, num_features: int, *, scale: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()


def test_builtins_are_registered_through_the_hooks(fresh_plugins):
    names = {info.name: info for info in fresh_plugins.info.values()}
    assert names["normzoo.norms"].hooks == ["register_norms"]
    assert names["normzoo.norms"].source == "builtin"
    assert fresh_plugins.registry("norms").get("lp").plugin == "normzoo.norms"
    assert fresh_plugins.registry("backbones").get("vgg11").plugin == "normzoo.backbones"
    assert fresh_plugins.pm.get_plugin("normzoo.norms") is sys.modules["normzoo.default_plugins.norms"]


def test_inline_plugin_registers_a_norm(fresh_plugins):
    fresh_plugins.register(OneNorm(), name="one")
    entry = fresh_plugins.registry("norms").get("ident")
    assert entry.plugin == "one" and [p.name for p in entry.params] == ["scale"]
    assert "register_norms" in fresh_plugins.info["one"].hooks


def test_duplicate_name_is_an_error_naming_both_plugins(fresh_plugins, capsys):
    fresh_plugins.register(OneNorm(), name="first")
    fresh_plugins.register(OneNorm(), name="second")
    entry = fresh_plugins.registry("norms").get("ident")
    assert entry.plugin == "first"
    error = " ".join(fresh_plugins.info["second"].errors)
    assert "'first'" in error and "'second'" in error and "ident" in error
    assert "registered by both" in capsys.readouterr().err


def test_duplicate_of_a_builtin_is_refused(fresh_plugins):
    class Shadow:
        @hookimpl
        def register_norms(self, register):
            register("bn", IdentNorm, summary="shadows bn")

    fresh_plugins.register(Shadow(), name="shadow")
    assert fresh_plugins.registry("norms").get("bn").plugin == "normzoo.norms"
    assert any("normzoo.norms" in e for e in fresh_plugins.info["shadow"].errors)


def test_raising_hook_is_reported_and_the_rest_keep_working(fresh_plugins):
    class Broken:
        @hookimpl
        def register_norms(self, register):
            register("half", IdentNorm, summary="registered before the crash")
            raise RuntimeError("boom")

    fresh_plugins.register(Broken(), name="broken")
    norms = fresh_plugins.registry("norms")
    assert "bn" in norms and "half" in norms
    assert any("raised in register_norms: RuntimeError: boom" in e for e in fresh_plugins.info["broken"].errors)


def test_strict_mode_reraises(fresh_plugins, monkeypatch):
    class Broken:
        @hookimpl
        def register_norms(self, register):
            raise RuntimeError("boom")

    monkeypatch.setenv("NORMZOO_STRICT_PLUGINS", "1")
    fresh_plugins.register(Broken(), name="broken")
    with pytest.raises(RuntimeError, match="boom"):
        fresh_plugins.registry("norms")


def test_misspelled_hook_is_caught(fresh_plugins):
    class Typo:
        @hookimpl
        def register_norm(self, register):  # missing "s"
            register("x", IdentNorm, summary="never registered")

    fresh_plugins.register(Typo(), name="typo")
    assert fresh_plugins.pm.get_plugin("typo") is None
    assert any("register_norm" in e for e in fresh_plugins.info["typo"].errors)


def test_invalid_name_and_bad_positional_are_reported(fresh_plugins):
    class Bad:
        @hookimpl
        def register_norms(self, register):
            register("has:colon", IdentNorm, summary="x")
            register("pos", IdentNorm, summary="x", positional="nope")

    fresh_plugins.register(Bad(), name="bad")
    norms = fresh_plugins.registry("norms")
    assert "pos" not in norms
    errors = " ".join(fresh_plugins.info["bad"].errors)
    assert "invalid norm name" in errors and "positional 'nope'" in errors


def test_entry_point_plugin_loads_with_its_version(site):
    install_fake_distribution(site, "nz-test-good", "nz_test_good", """
        from torch import nn
        from normzoo import hookimpl

        class Good(nn.Identity):
            def __init__(self, num_features, *, device=None, dtype=None):
                super().__init__()

        @hookimpl
        def register_norms(register):
            register("good", Good, summary="from an installed package")
    """)
    reset_plugins()
    manager = get_plugins()
    assert manager.info["nz-test-good"].version == "0.3.1"
    assert manager.info["nz-test-good"].source == "entry point nz-test-good"
    assert manager.registry("norms").get("good").plugin == "nz-test-good"


def test_entry_point_that_fails_to_import_is_reported(site, capsys):
    install_fake_distribution(site, "nz-test-broken", "nz_test_broken", "raise ImportError('missing dep xyz')\n")
    reset_plugins()
    manager = get_plugins()
    assert "bn" in manager.registry("norms")
    assert "missing dep xyz" in manager.info["nz-test-broken"].errors[0]
    assert "nz-test-broken" in capsys.readouterr().err


def test_entry_point_import_error_raises_in_strict_mode(site, monkeypatch):
    install_fake_distribution(site, "nz-test-broken2", "nz_test_broken2", "raise ImportError('nope')\n")
    monkeypatch.setenv("NORMZOO_STRICT_PLUGINS", "1")
    reset_plugins()
    with pytest.raises(ImportError, match="nope"):
        get_plugins()


@pytest.mark.parametrize("selection, loaded", [("", False), ("nz-test-sel", True), ("other", False)])
def test_load_plugins_env_selects_external_plugins(site, monkeypatch, selection, loaded):
    install_fake_distribution(site, "nz-test-sel", "nz_test_sel", """
        from normzoo import hookimpl

        @hookimpl
        def register_datasets(register):
            pass
    """)
    monkeypatch.setenv("NORMZOO_LOAD_PLUGINS", selection)
    reset_plugins()
    manager = get_plugins()
    assert ("nz-test-sel" in manager.info) is loaded
    assert "normzoo.norms" in manager.info  # built-ins always load


def test_plugin_error_type_is_user_facing():
    # A plugin whose code fails is not the user's bad input (exit 2): the line names the plugin, the exit is 1.
    assert issubclass(PluginError, Exception) and PluginError.exit_code == 1


def test_two_packages_with_one_entry_point_name_show_the_error_on_the_skipped_one(site, capsys):
    for dist, module in (("nz-test-first", "nz_test_first"), ("nz-test-second", "nz_test_second")):
        install_fake_distribution(site, dist, module, """
            from normzoo import hookimpl

            @hookimpl
            def register_datasets(register):
                pass
        """, ep_name="samename")
    reset_plugins()
    rows = [info for info in get_plugins().info.values() if info.name == "samename"]
    assert len(rows) == 2
    kept, skipped = sorted(rows, key=lambda info: bool(info.errors))
    assert kept.errors == [] and len(skipped.errors) == 1 and kept.source != skipped.source
    assert "same name as an already loaded plugin" in skipped.errors[0]
    assert kept.source in skipped.errors[0] and skipped.source.removeprefix("entry point ") in skipped.errors[0]


class BadNorms:
    """Norms that break the constructor contract, next to one that keeps it."""

    @hookimpl
    def register_norms(self, register):
        register("channels-second", lambda eps, num_features: nn.Identity(), summary="wrong order")
        register("no-device", lambda num_features, *, eps=1e-5: nn.Identity(), summary="no device/dtype")
        register("good", IdentNorm, summary="keeps the contract")


def test_norm_breaking_the_constructor_contract_is_reported_naming_the_plugin(fresh_plugins, capsys):
    fresh_plugins.register(BadNorms(), name="bad-norms")
    norms = fresh_plugins.registry("norms")
    assert "good" in norms and "bn" in norms
    assert "channels-second" not in norms and "no-device" not in norms
    errors = " | ".join(fresh_plugins.info["bad-norms"].errors)
    assert "plugin 'bad-norms': norm 'channels-second' breaks the constructor contract" in errors
    assert "first positional parameter must be num_features (it is eps)" in errors
    assert "norm 'no-device'" in errors and "does not accept device or dtype" in errors
    assert "bad-norms" in capsys.readouterr().err
