"""Plugin loading and the registries it fills.

Built-in plugins (``normzoo.default_plugins.*``) and installed packages in the ``normzoo`` entry-point group
go through the same hooks. Each external plugin is imported and each hook implementation is called in its own
guard: a failure is recorded against the plugin's name (``normzoo plugins`` and stderr show it) and the rest
keep working. ``NORMZOO_STRICT_PLUGINS=1`` re-raises instead. ``NORMZOO_LOAD_PLUGINS=a,b`` loads only the
named external plugins (an empty value loads none).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from normzoo import hookspecs
from normzoo.errors import PluginError
from normzoo.registry import Registry

ENTRY_POINT_GROUP = "normzoo"
DEFAULT_PLUGINS = (
    "normzoo.default_plugins.norms",
    "normzoo.default_plugins.backbones",
    "normzoo.default_plugins.datasets",
)


def strict_mode() -> bool:
    return os.environ.get("NORMZOO_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}


@dataclass
class PluginInfo:
    """What ``normzoo plugins`` shows about one plugin."""

    name: str
    version: str
    source: str  # "builtin", "entry point <dist>", or "registered"
    hooks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "plugin": self.name, "version": self.version, "source": self.source,
                "summary": self.source, "hooks": self.hooks, "errors": self.errors}


class Plugins:
    """The plugin manager plus the registries built from it."""

    def __init__(self, *, load_entrypoints: bool = True) -> None:
        self.pm = pluggy.PluginManager("normzoo")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self._registries: dict[str, Registry] = {}
        from normzoo import __version__

        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            self._add(module, module_name.replace(".default_plugins", ""), __version__, "builtin")
        if load_entrypoints:
            self._load_entrypoints()

    # -- loading ---------------------------------------------------------------------------------------------
    def _load_entrypoints(self) -> None:
        wanted = os.environ.get("NORMZOO_LOAD_PLUGINS")
        selected = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else "?"
            if selected is not None and ep.name not in selected and dist_name not in selected:
                continue
            if ep.name in self.info:
                # The skipped package gets its own row, so the error is shown against it, not the loaded one.
                row = f"{ep.name} ({dist_name})"
                self.info[row] = PluginInfo(ep.name, version, f"entry point {dist_name}")
                self._fail(row, f"entry point '{ep.name}' from {dist_name} has the same name as an already loaded "
                                f"plugin ({self.info[ep.name].source}); skipped")
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the CLI down
                self.info[ep.name] = PluginInfo(ep.name, version, f"entry point {dist_name}")
                self._fail(ep.name, f"failed to import {ep.value}: {type(exc).__name__}: {exc}", exc)
                continue
            self._add(module, ep.name, version, f"entry point {dist_name}")

    def _add(self, plugin: object, name: str, version: str, source: str) -> None:
        self.info[name] = info = PluginInfo(name, version, source)
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()  # a misspelled hook name is an error, not a silent no-op
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(name, f"{type(exc).__name__}: {exc}", exc)
            return
        info.hooks = self._hooks_of(name)
        self._registries.clear()

    def register(self, plugin: object, name: str, version: str = "0") -> None:
        """Register an in-process plugin (an object or module with ``@hookimpl`` functions), e.g. in tests."""
        self._add(plugin, name, version, "registered")

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.info.pop(name, None)
        self._registries.clear()

    def _hooks_of(self, name: str) -> list[str]:
        return sorted(hook for hook in hookspecs.KINDS.values()
                      if any(i.plugin_name == name for i in getattr(self.pm.hook, hook).get_hookimpls()))

    def _fail(self, plugin: str, message: str, exc: BaseException | None = None) -> None:
        if strict_mode():
            if exc is not None:
                raise exc
            raise PluginError(f"plugin '{plugin}': {message}")
        self.info.setdefault(plugin, PluginInfo(plugin, "?", "unknown")).errors.append(message)
        print(f"normzoo: plugin '{plugin}': {message}", file=sys.stderr)
        if exc is not None and os.environ.get("NORMZOO_DEBUG"):
            traceback.print_exception(exc)

    # -- registries ------------------------------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        """The registry of ``kind`` ("norms", "backbones", "datasets", "probes"), built on first use."""
        if kind not in hookspecs.KINDS:
            raise KeyError(kind)
        if kind not in self._registries:
            registry = Registry(kind)
            hook = getattr(self.pm.hook, hookspecs.KINDS[kind])
            for impl in hook.get_hookimpls():  # registration order: built-ins first, so they keep their names
                self._call_register_hook(registry, impl)
            self._registries[kind] = registry
        return self._registries[kind]

    def _call_register_hook(self, registry: Registry, impl: Any) -> None:
        plugin = impl.plugin_name

        def register(name: str, factory: Any, *, summary: str = "", reference: str = "",
                     positional: str | None = None, **extra: Any) -> None:
            try:
                registry.add(plugin, name, factory, summary=summary, reference=reference,
                             positional=positional, **extra)
            except PluginError as exc:
                self._fail(plugin, str(exc), exc)

        try:
            impl.function(*[{"register": register}[arg] for arg in impl.argnames])
        except Exception as exc:
            self._fail(plugin, f"raised in {impl.function.__name__}: {type(exc).__name__}: {exc}", exc)

    def versions(self) -> dict[str, str]:
        return {name: info.version for name, info in self.info.items()}


_PLUGINS: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager (created, and entry points loaded, on first call)."""
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = Plugins()
    return _PLUGINS


def reset_plugins() -> None:
    """Forget the process-wide manager so the next :func:`get_plugins` reloads (tests, env changes)."""
    global _PLUGINS
    _PLUGINS = None


def registry(kind: str) -> Registry:
    return get_plugins().registry(kind)
