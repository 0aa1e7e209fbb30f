"""Plugin loading and the registries it fills.

Built-in plugins (``normzoo.default_plugins.*``) and installed packages in the ``normzoo`` entry-point group go
through the same hooks. Each external plugin is imported and each hook implementation is called in its own guard:
a failure is recorded against the plugin's name (``normzoo plugins`` and stderr show it) and the rest keep
working. ``NORMZOO_STRICT_PLUGINS=1`` re-raises instead. ``NORMZOO_LOAD_PLUGINS=a,b`` loads only the named
external plugins (an empty value loads none).

What the installed plugins register is kept in a cache (:mod:`normzoo.registry_cache`): a process whose
installation matches the cache imports no plugin at all until it builds something, so listings need no torch and
``normzoo run`` imports only what its run uses. Plugins registered in this process (:meth:`Plugins.register`,
e.g. in tests) are always called live, after the installed ones.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from normzoo import hookspecs, registry_cache
from normzoo.errors import PluginError
from normzoo.registries import Entry, Registry

ENTRY_POINT_GROUP = "normzoo"
DEFAULT_PLUGINS = (
    "normzoo.default_plugins.norms",
    "normzoo.default_plugins.backbones",
    "normzoo.default_plugins.datasets",
    "normzoo.default_plugins.loggers",
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
    """The plugin manager plus the registries built from it.

    ``info`` lists every plugin (installed ones first). The pluggy manager itself, ``pm``, is made only when
    something needs the plugins' code: on a cache miss, for a plugin registered in this process, or when asked.
    """

    def __init__(self, *, load_entrypoints: bool = True) -> None:
        from normzoo import __version__

        self.version = __version__
        self.load_entrypoints = load_entrypoints
        self.info: dict[str, PluginInfo] = {}
        self._registries: dict[str, Registry] = {}
        self._pm: pluggy.PluginManager | None = None
        self._installed_live = False  # whether the installed plugins are in ``pm`` (their hooks get called)
        self._registered: dict[str, tuple[object, str]] = {}  # plugins registered in this process, in order
        self._saved = False
        self._accepted: dict[str, dict[str, list[Entry]]] = {}  # plugin -> kind -> entries it registered
        self._cached: dict[str, Any] | None = None
        self._entry_points = self._selected_entry_points() if load_entrypoints else []
        use_cache = load_entrypoints and not strict_mode()
        self._cache_file = registry_cache.cache_path(self._entry_points) if use_cache else None
        self._fingerprint = registry_cache.fingerprint(self._entry_points, __version__) if self._cache_file else ""
        self._cached = registry_cache.read(self._cache_file, self._fingerprint)
        if self._cached is None:
            self._load_installed()
        else:
            self._restore_info()

    @property
    def pm(self) -> pluggy.PluginManager:
        """The pluggy manager with every installed plugin registered (importing them if the cache spared it)."""
        if not self._installed_live:
            self._load_installed()
        assert self._pm is not None
        return self._pm

    def _manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            self._pm = pluggy.PluginManager("normzoo")
            self._pm.add_hookspecs(hookspecs)
        return self._pm

    # -- loading ---------------------------------------------------------------------------------------------
    def _selected_entry_points(self) -> list[Any]:
        wanted = os.environ.get("NORMZOO_LOAD_PLUGINS")
        selected = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
        chosen = []
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            if selected is None or ep.name in selected or dist_name in selected:
                chosen.append(ep)
        return chosen

    def _load_installed(self) -> None:
        """Import the built-in and installed plugins into a new ``pm`` (the registries are then built from their
        hooks); plugins registered in this process are registered again after them."""
        self.info, self._pm = {}, None
        self._manager()
        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            self._add(module, module_name.replace(".default_plugins", ""), self.version, "builtin")
        for ep in self._entry_points:
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else "?"
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
        for name, (plugin, version) in self._registered.items():  # after the installed ones, as before
            self._add(plugin, name, version, "registered")
        self._installed_live = True
        self._cached = None
        self._registries.clear()

    def _restore_info(self) -> None:
        assert self._cached is not None
        for record in self._cached["plugins"]:
            self.info[record["row"]] = PluginInfo(**record["info"])
            for message in record["info"]["errors"]:
                print(f"normzoo: plugin '{record['row']}': {message}", file=sys.stderr)
            if record.get("live"):  # its factories have no import path: its hooks run in every process
                self._add_live_installed(record)

    def _add_live_installed(self, record: dict[str, Any]) -> None:
        ep = next((e for e in self._entry_points if e.name == record["row"]), None)
        if ep is None:
            return
        try:
            module = ep.load()
        except Exception as exc:  # noqa: BLE001 - reported like any import failure
            self._fail(record["row"], f"failed to import {ep.value}: {type(exc).__name__}: {exc}", exc)
            return
        self._manager().register(module, name=record["row"])

    def _add(self, plugin: object, name: str, version: str, source: str) -> None:
        self.info[name] = info = PluginInfo(name, version, source)
        pm = self._manager()
        try:
            pm.register(plugin, name=name)
            pm.check_pending()  # a misspelled hook name is an error, not a silent no-op
        except Exception as exc:
            if pm.is_registered(plugin):
                pm.unregister(plugin)
            self._fail(name, f"{type(exc).__name__}: {exc}", exc)
            return
        info.hooks = self._hooks_of(name)
        self._registries.clear()

    def register(self, plugin: object, name: str, version: str = "0") -> None:
        """Register an in-process plugin (an object or module with ``@hookimpl`` functions), e.g. in tests."""
        self._add(plugin, name, version, "registered")
        self._registered[name] = (plugin, version)

    def unregister(self, name: str) -> None:
        plugin = self._pm.get_plugin(name) if self._pm is not None else None
        if plugin is not None:
            self._pm.unregister(plugin)
        self.info.pop(name, None)
        self._registered.pop(name, None)
        self._registries.clear()

    def _hooks_of(self, name: str) -> list[str]:
        pm = self._manager()
        return sorted(hook for hook in hookspecs.KINDS.values()
                      if any(i.plugin_name == name for i in getattr(pm.hook, hook).get_hookimpls()))

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
        """The registry of ``kind`` ("norms", "backbones", "datasets", "probes", "loggers"), built on first use."""
        if kind not in hookspecs.KINDS:
            raise KeyError(kind)
        if kind not in self._registries:
            if self._cached is None and self._cache_file is not None and not self._saved:
                # Fill every kind now, so that the cache this process writes is complete.
                for other in hookspecs.KINDS:
                    self._registries[other] = self._build(other)
                self._save_cache()
                self._saved = True
            else:
                self._registries[kind] = self._build(kind)
        return self._registries[kind]

    def _build(self, kind: str) -> Registry:
        registry = Registry(kind)
        if self._cached is not None:
            for record in self._cached["plugins"]:
                for data in record.get("entries", {}).get(kind, []):
                    registry.restore(Entry.from_json(kind, record["row"], data))
        if self._pm is not None:
            hook = getattr(self._pm.hook, hookspecs.KINDS[kind])
            for impl in hook.get_hookimpls():  # registration order: built-ins first, so they keep their names
                self._call_register_hook(registry, impl)
        return registry

    def _call_register_hook(self, registry: Registry, impl: Any) -> None:
        plugin = impl.plugin_name
        accepted = self._accepted.setdefault(plugin, {}).setdefault(registry.kind, [])
        accepted.clear()

        def register(name: str, factory: Any, *, summary: str = "", reference: str = "",
                     positional: str | None = None, **extra: Any) -> None:
            try:
                accepted.append(registry.add(plugin, name, factory, summary=summary, reference=reference,
                                             positional=positional, **extra))
            except PluginError as exc:
                self._fail(plugin, str(exc), exc)

        try:
            impl.function(*[{"register": register}[arg] for arg in impl.argnames])
        except Exception as exc:
            self._fail(plugin, f"raised in {impl.function.__name__}: {type(exc).__name__}: {exc}", exc)

    def _save_cache(self) -> None:
        """Write what the installed plugins registered (not the in-process ones) for the next process."""
        plugins = []
        for row, info in self.info.items():
            if row in self._registered:
                continue
            entries = {kind: [entry.to_json() for entry in self._accepted.get(row, {}).get(kind, [])]
                       for kind in hookspecs.KINDS}
            live = any(data is None for kind_entries in entries.values() for data in kind_entries)
            plugins.append({"row": row, "info": asdict(info), "live": live,
                            "entries": {} if live else entries})
        registry_cache.write(self._cache_file, {"fingerprint": self._fingerprint, "plugins": plugins})

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
