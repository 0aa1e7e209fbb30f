"""The registries of the installed plugins, kept on disk, so that listing them and starting a run import no plugin.

Filling the registries means importing every plugin and calling its hooks, and plugins import torch, timm and
torchvision to hand over their classes: seconds of start-up for a command that only lists names, or trains a
VGG. So the first process that fills them writes what each installed plugin registered (names, summaries,
typed parameters with their ranges, and each factory as an import path) to a JSON file, and later processes read
it and import a factory only when something is built from it.

The file is valid only for the installation that wrote it: its fingerprint covers normzoo's version, the Python
version, the plugin selection (``NORMZOO_LOAD_PLUGINS``), the installed entry points with their distributions'
versions, the distributions installed in the site-packages folders and the size and modification time of
every source file of normzoo and of each plugin's package (editable installs change those). Any difference
refills the registries. A plugin whose factories cannot be named by import path (a lambda, a class made inside a
function) is marked live: its module is imported and its hooks called in every process, as without a cache.

``NORMZOO_NO_CACHE=1`` turns the cache off; ``NORMZOO_CACHE_DIR`` moves it (default ``$XDG_CACHE_HOME/normzoo``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import site
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from normzoo.spec import Param, Range

CACHE_VERSION = 1
CACHE_DIR_ENV = "NORMZOO_CACHE_DIR"
NO_CACHE_ENV = "NORMZOO_NO_CACHE"
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def cache_path(entry_points: Iterable[Any]) -> Path | None:
    """Where the registry file of this Python environment and set of plugins lives, or None when caching is off.

    One file per set of entry points: an environment that alternates between plugin selections (or a test that
    installs a plugin for a moment) keeps a valid file for each instead of rewriting one.
    """
    if os.environ.get(NO_CACHE_ENV, "").strip().lower() in {"1", "true", "yes"}:
        return None
    base = os.environ.get(CACHE_DIR_ENV, "").strip()
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        base = str(Path(xdg or Path.home() / ".cache") / "normzoo")
    key = "\n".join([sys.prefix, *sorted(f"{ep.name}={ep.value}" for ep in entry_points)])
    return Path(base).expanduser() / f"registries-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


# -- what the registries depend on ----------------------------------------------------------------------------
def _package_root(module: str) -> Path | None:
    """The folder (or file) of a top-level module, found without importing it."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin else None


def _source_stats(root: Path | None) -> Iterable[str]:
    if root is None:
        return
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue
        yield f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"


def _installed(folder: str) -> list[str]:
    """What an install or uninstall changes in a site-packages folder: its distributions' metadata folders (name and
    version) and path files. Not the folder's modification time: Python changes that when it first writes bytecode
    of a top-level module there, as every process does after an install that compiled none (``uv pip install``)."""
    try:
        return sorted(name for name in os.listdir(folder) if name.endswith((".dist-info", ".egg-info", ".pth")))
    except OSError:
        return []


def fingerprint(entry_points: Iterable[Any], version: str) -> str:
    """A digest of everything the installed plugins' registrations depend on (see the module docstring)."""
    digest = hashlib.sha256()
    parts = [str(CACHE_VERSION), version, sys.version, os.environ.get("NORMZOO_LOAD_PLUGINS", "<unset>")]
    folders = [*site.getsitepackages(), site.getusersitepackages()] if hasattr(site, "getsitepackages") else []
    for folder in folders:
        parts.append(f"{folder}\0" + "\0".join(_installed(folder)))
    parts += _source_stats(_package_root("normzoo"))
    for ep in entry_points:
        dist = getattr(ep, "dist", None)
        name, version = (dist.metadata["Name"], dist.version) if dist is not None else ("?", "?")
        parts.append(f"{ep.name}\0{ep.value}\0{name}\0{version}")
        parts += _source_stats(_package_root(ep.value.split(":")[0]))
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


# -- factories by import path ---------------------------------------------------------------------------------
def factory_ref(factory: Callable[..., Any]) -> dict[str, Any] | None:
    """``{"module", "qualname"[, "args", "kwargs"]}`` naming ``factory`` so that another process imports the same
    object, or None when it has no such name (a lambda, a local class, a partial of something unnamed)."""
    if isinstance(factory, functools.partial):
        inner = factory_ref(factory.func)
        try:
            json.dumps([factory.args, factory.keywords])
        except (TypeError, ValueError):
            return None
        return None if inner is None else {**inner, "args": list(factory.args), "kwargs": dict(factory.keywords)}
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    try:
        found = _lookup(module, qualname)
    except Exception:  # noqa: BLE001 - anything that cannot be looked up again is simply not cacheable
        return None
    return {"module": module, "qualname": qualname} if found is factory else None


def _lookup(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_ref(ref: dict[str, Any]) -> Callable[..., Any]:
    """The factory a :func:`factory_ref` names (imports its module)."""
    factory = _lookup(ref["module"], ref["qualname"])
    if ref.get("args") or ref.get("kwargs"):
        factory = functools.partial(factory, *ref.get("args", ()), **ref.get("kwargs", {}))
    return factory


# -- parameters as JSON ---------------------------------------------------------------------------------------
def param_to_json(param: Param) -> dict[str, Any]:
    bounds = param.range
    return {"name": param.name, "type": param.type.__name__, "default": param.default,
            "choices": list(param.choices) if param.choices is not None else None,
            "range": None if bounds is None else {"low": bounds.low, "high": bounds.high, "low_open": bounds.low_open,
                                                  "high_open": bounds.high_open, "inf": bounds.inf}}


def param_from_json(data: dict[str, Any]) -> Param:
    choices = tuple(data["choices"]) if data.get("choices") is not None else None
    bounds = Range(**data["range"]) if data.get("range") else None
    return Param(data["name"], _TYPES[data["type"]], data["default"], choices, bounds)


# -- the file -------------------------------------------------------------------------------------------------
def read(path: Path | None, expected: str) -> dict[str, Any] | None:
    """The cached registrations if the file exists and matches ``expected``; None otherwise (never an error)."""
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("fingerprint") != expected:
        return None
    return data


def write(path: Path | None, data: dict[str, Any]) -> None:
    """Write the cache atomically; a folder that cannot be written only means no cache."""
    if path is None:
        return
    from normzoo.io import atomic_write_text

    try:
        atomic_write_text(path, json.dumps({"version": CACHE_VERSION, **data}, allow_nan=True))
    except OSError:
        pass
