"""Name -> factory registries, one per kind (norms, backbones, datasets, probes), filled by plugins."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from normzoo.errors import NormzooError, PluginError, SpecError, did_you_mean, is_out_of_memory
from normzoo.spec import Param, Spec, clip, params_from_signature, resolve, split_spec

# Arguments the core passes itself; they never appear in a spec.
RESERVED = frozenset({"self", "num_features", "device", "dtype", "norm_layer", "num_classes", "in_chans",
                      "data_dir"})


@dataclass(frozen=True)
class Entry:
    """One registered name: who registered it, what it builds, and the parameters its spec takes.

    ``factory`` is the callable itself, or, for an entry read from the registry cache, found by its import path
    on first use (``ref``), so that naming and listing it imports nothing.
    """

    kind: str
    name: str
    plugin: str
    summary: str
    reference: str = ""
    positional: str | None = None
    params: tuple[Param, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    ref: dict[str, Any] | None = None
    _factory: list[Callable[..., Any]] = field(default_factory=list, repr=False, compare=False)

    @property
    def factory(self) -> Callable[..., Any]:
        if not self._factory:
            from normzoo.registry_cache import resolve_ref

            try:
                self._factory.append(resolve_ref(self.ref or {}))
            except Exception as exc:
                raise PluginError(f"{self.kind[:-1]} '{self.name}' ({self.origin}) cannot be imported: "
                                  f"{type(exc).__name__}: {exc}") from exc
        return self._factory[0]

    @property
    def report(self) -> str | None:
        """A probe's report as an import path (see :mod:`normzoo.probe_report`), or None: the generic one."""
        return self.extra.get("report")

    @property
    def origin(self) -> str:
        """``built-in`` or ``plugin 'name'``, for messages."""
        return "built-in" if self.plugin.startswith("normzoo.") else f"plugin '{self.plugin}'"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "plugin": self.plugin,
            "summary": self.summary,
            "reference": self.reference,
            "positional": self.positional,
            "params": {p.name: {"type": "|".join(p.choices) if p.choices else p.type.__name__,
                                "default": p.format(p.default)} for p in self.params},
            **{k: v for k, v in self.extra.items() if isinstance(v, (str, int, float, bool, list, dict))},
        }

    def to_json(self) -> dict[str, Any] | None:
        """The entry as cache data, or None when its factory (or an extra) cannot be written down."""
        from normzoo.registry_cache import factory_ref, param_to_json

        ref = self.ref or factory_ref(self.factory)
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError):
            return None
        if ref is None:
            return None
        return {"name": self.name, "summary": self.summary, "reference": self.reference,
                "positional": self.positional, "params": [param_to_json(p) for p in self.params],
                "extra": self.extra, "ref": ref}

    @classmethod
    def from_json(cls, kind: str, plugin: str, data: dict[str, Any]) -> Entry:
        from normzoo.registry_cache import param_from_json

        return cls(kind, data["name"], plugin, data["summary"], data["reference"], data["positional"],
                   tuple(param_from_json(p) for p in data["params"]), data["extra"], data["ref"])


class Registry:
    """The entries of one kind, keyed by name. Duplicate names are refused with both plugins named."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, plugin: str, name: str, factory: Callable[..., Any], *, summary: str, reference: str = "",
            positional: str | None = None, **extra: Any) -> Entry:
        if not isinstance(name, str) or not name or any(c in name for c in ":,= "):
            raise PluginError(f"plugin '{plugin}' registered an invalid {self.kind[:-1]} name {name!r} "
                              "(no ':', ',', '=' or spaces)")
        if not callable(factory):
            raise PluginError(f"plugin '{plugin}' registered {self.kind[:-1]} '{name}' with a non-callable factory")
        if name in self._entries:
            first = self._entries[name].plugin
            raise PluginError(f"{self.kind[:-1]} '{name}' is registered by both plugin '{first}' and plugin "
                              f"'{plugin}'; the one from '{first}' is kept")
        if self.kind == "norms":
            problem = norm_constructor_problem(factory)
            if problem:
                raise PluginError(f"plugin '{plugin}': norm '{name}' breaks the constructor contract "
                                  f"Norm(num_features, *, eps, affine, device=None, dtype=None, **params): {problem}")
        params = params_from_signature(factory, RESERVED)
        if self.kind == "probes":
            # Kept with the entry (and so in the registry cache): the report finds it without importing the probe.
            report = getattr(factory, "report", None)
            extra = {"report": report if isinstance(report, str) else None, **extra}
        if positional is not None and positional not in {p.name for p in params}:
            raise PluginError(f"plugin '{plugin}': {self.kind[:-1]} '{name}' declares positional '{positional}', "
                              "which is not a defaulted parameter of its factory")
        entry = Entry(self.kind, name, plugin, summary.strip(), reference, positional, params, extra,
                      _factory=[factory])
        self._entries[name] = entry
        return entry

    def restore(self, entry: Entry) -> None:
        """Add an entry the registry cache kept (it passed :meth:`add`'s checks when it was registered)."""
        self._entries[entry.name] = entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self.names()) or "none registered"
            raise SpecError(f"unknown {self.kind[:-1]} '{clip(name)}'{did_you_mean(name, self._entries)}; "
                            f"valid: {valid}") from None

    def parse(self, text: str | Spec | Resolved) -> Spec:
        """Parse a spec string against this registry; a :class:`Spec` passes through re-validated."""
        return self.resolve(text).spec

    def resolve(self, text: str | Spec | Resolved) -> Resolved:
        """The spec parsed once into what builds it (a :class:`Resolved` of this registry passes through)."""
        if isinstance(text, Resolved) and text.entry.kind == self.kind:
            return text
        if isinstance(text, Resolved):
            text = text.spec
        if isinstance(text, Spec):
            text = text.canonical()
        family, positional_text, pairs = split_spec(text)
        entry = self.get(family)
        return Resolved(resolve(family, positional_text, pairs, entry.params, entry.positional), entry)

    def build(self, spec: str | Spec | Resolved, /, *args: Any, **kwargs: Any) -> Any:
        """Resolve ``spec`` and call its factory with ``*args``, the core's ``**kwargs`` and the spec's values."""
        return self.resolve(spec).build(*args, **kwargs)


@dataclass(frozen=True)
class Resolved:
    """A spec resolved once: its typed values, the entry (plugin, factory) that builds it, its canonical text.

    What backbones, norm placement and the timm bridge pass around instead of strings, so that a spec is parsed
    once however many layers are built from it.
    """

    spec: Spec
    entry: Entry
    canonical: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "canonical", self.spec.canonical())

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.spec.kwargs

    def short(self) -> str:
        return self.spec.short()

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """Call the factory with ``*args``, the core's ``**kwargs`` and the spec's values.

        A factory that rejects its values (``ValueError``) gives a one-line :class:`SpecError`; any other
        exception from plugin code a :class:`PluginError` naming the plugin. Running out of memory is not the
        plugin's fault and propagates as it is.
        """
        kind, entry = self.entry.kind[:-1], self.entry
        try:
            return entry.factory(*args, **kwargs, **self.spec.kwargs)
        except (NormzooError, MemoryError):
            raise
        except ValueError as exc:
            raise SpecError(f"{kind} '{clip(self.short())}' ({entry.origin}): {clip(exc, 300)}") from exc
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            raise PluginError(f"{kind} '{clip(self.short())}' ({entry.origin}) failed: "
                              f"{type(exc).__name__}: {clip(exc, 300)}") from exc

    def __str__(self) -> str:
        return self.canonical


def norm_constructor_problem(factory: Callable[..., Any]) -> str:
    """What is wrong with a norm factory's signature, or ``""``: it must take the channel count first and accept
    ``device`` and ``dtype`` keywords (the core and timm's ``norm_layer=`` pass them)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return "its signature cannot be inspected"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional or positional[0].name != "num_features":
        first = positional[0].name if positional else "none"
        return f"the first positional parameter must be num_features (it is {first})"
    required = [p.name for p in positional[1:] if p.default is p.empty]
    if required:
        return f"parameters after num_features need defaults ({', '.join(required)} do not)"
    names = {p.name for p in params}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    missing = [k for k in ("device", "dtype") if k not in names and not takes_any]
    return f"it does not accept {' or '.join(missing)}" if missing else ""
