"""Model checkpoints: safetensors weights plus the metadata needed to rebuild the model.

The layout and its reasons are in docs/design.md, "Run folders and checkpoints".

The safetensors metadata holds one key, ``"normzoo"``, whose value is a JSON object: the format and normzoo
versions, the canonical backbone and norm specs, ``num_classes``, ``in_chans``, the dataset, its classes and
input shape, the plugins that registered the norm and the backbone with their versions, every loaded
plugin's version, a checksum of the tensors, and whatever else the caller passed in ``info`` (step, metrics).
:func:`load_checkpoint` rebuilds the model with :func:`normzoo.models.build_model` from that metadata and loads
the weights strictly. Every failure (missing file, not safetensors, truncated or corrupt, no normzoo metadata,
a plugin that is not installed, keys or shapes that do not fit) is a one-line :class:`NormzooError`.
Files hold tensors and JSON only; nothing is ever deserialized into Python objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normzoo.errors import NormzooError, is_out_of_memory
from normzoo.io import (header_metadata, load_safetensors, pack, parse_normzoo_metadata, prepare_tensors,
                        read_safetensors_header, save_safetensors, tensors_digest, to_json, unpack)
from normzoo.spec import clip

FORMAT = "normzoo-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "normzoo"
# A run's last checkpoint carries its training state (optimizer, RNG, loop counters) in the same file, so that
# weights and state are one unit, written by one atomic rename: tensors under this prefix, JSON under this key.
EMBEDDED_STATE_PREFIX = "training_state."
EMBEDDED_STATE_KEY = "normzoo_training_state"
_EXTRA_PREFIX = "__extra_state__."
CONFIG_KEYS = ("backbone", "norm", "num_classes", "in_chans")
# Keys save_checkpoint computes itself; ``info`` may repeat them only with the same value.
RESERVED_KEYS = frozenset({"format", "format_version", "normzoo_version", "torch_version", *CONFIG_KEYS,
                           "norm_plugin", "backbone_plugin", "plugin_versions", "tensors_sha256", "aliases",
                           "extra_state"})


# -- keys ------------------------------------------------------------------------------------------------------
def strip_wrapper_prefixes(keys: Iterable[str]) -> dict[str, str]:
    """Map each state-dict key to its name without wrapper prefixes.

    ``_orig_mod.`` (``torch.compile``) is dropped wherever it appears as a path component; a leading
    ``module.`` (DDP, DataParallel) only when every key has it, so a real submodule named ``module`` survives.
    """
    keys = list(keys)
    names = {k: ".".join(part for part in k.split(".") if part != "_orig_mod") for k in keys}
    while names and all(v.startswith("module.") for v in names.values()):
        names = {k: v[len("module."):] for k, v in names.items()}
    return names


def _unwrapped_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    renamed = strip_wrapper_prefixes(state)
    if len(set(renamed.values())) != len(renamed):
        raise NormzooError("stripping torch.compile/DDP prefixes from the state dict makes two keys collide")
    return {renamed[k]: v for k, v in state.items()}


# -- saving ----------------------------------------------------------------------------------------------------
def _model_config(model: nn.Module) -> dict[str, Any]:
    """``normzoo_config`` of the model or of the module it wraps (``.module``, ``._orig_mod``)."""
    seen = set()
    current: Any = model
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        config = getattr(current, "normzoo_config", None)
        if config is not None:
            missing = [k for k in CONFIG_KEYS if k not in config]
            if missing:
                raise NormzooError(f"model.normzoo_config lacks {', '.join(missing)}; build the model with "
                                   "normzoo.build_model")
            return {k: _spec_text(config[k]) if k in ("backbone", "norm") else int(config[k]) for k in CONFIG_KEYS}
        children = dict(current.named_children()) if isinstance(current, nn.Module) else {}
        current = children.get("_orig_mod", children.get("module"))
    raise NormzooError(f"cannot checkpoint a {type(model).__name__} without normzoo_config: build the model with "
                       "normzoo.build_model so the checkpoint records how to rebuild it")


def _spec_text(spec: Any) -> str:
    return spec.canonical() if hasattr(spec, "canonical") else str(spec)


def _family(spec: str) -> str:
    from normzoo.spec import split_spec

    return split_spec(spec)[0]


def _plugin_of(kind: str, family: str) -> dict[str, Any] | None:
    """Which plugin registered ``family`` in the ``kind`` registry, its version and distribution."""
    from normzoo.plugins import get_plugins

    plugins = get_plugins()
    registry = plugins.registry(kind)
    if family not in registry:
        return None
    name = registry.get(family).plugin
    info = plugins.info.get(name)
    version = info.version if info is not None else None
    return {"name": name, "version": version, "distribution": _distribution(info)}


def _distribution(info: Any) -> str | None:
    if info is None:
        return None
    if info.source == "builtin":
        return "normzoo"
    if info.source.startswith("entry point "):
        return info.source[len("entry point "):]
    return None


def _split_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """Tensors to store, aliases (tied weights: key -> stored key) and non-tensor extra state."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    extra: dict[str, Any] = {}
    views: dict[tuple[Any, ...], str] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            extra[key] = value
            continue
        if value.numel():
            view = (value.device, value.dtype, value.untyped_storage().data_ptr(), value.storage_offset(),
                    tuple(value.shape), tuple(value.stride()))
            if view in views:
                aliases[key] = views[view]
                continue
            views[view] = key
        tensors[key] = value
    return tensors, aliases, extra


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, *, info: Mapping[str, Any] | None = None,
                    training_state: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]] | None = None) -> Path:
    """Save ``model``'s weights and the metadata to rebuild it to ``path`` (safetensors), atomically.

    ``model`` must carry ``normzoo_config`` (set by :func:`normzoo.build_model`), possibly under a
    ``torch.compile`` or DDP wrapper, whose prefixes are stripped from the keys. ``info`` supplies
    ``dataset``, ``classes`` and ``input_shape`` and any further JSON-able fields (``step``, metrics, ...).
    Tied weights are stored once. ``training_state`` (from :func:`normzoo.state.training_state_parts`) is
    embedded in the same file, so weights and state are written, and found, together. Returns the path.
    """
    from normzoo import __version__
    from normzoo.plugins import get_plugins

    config = _model_config(model)
    info = dict(info or {})
    state = _unwrapped_state_dict(model.state_dict())
    tensors, aliases, extra_state = _split_state(state)
    tensors = prepare_tensors(tensors)  # CPU copies once, for both the checksum and the file

    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "normzoo_version": __version__,
        "torch_version": torch.__version__,
        **config,
        "input_shape": None,
        "dataset": None,
        "classes": None,
        "norm_plugin": _plugin_of("norms", _family(config["norm"])),
        "backbone_plugin": _plugin_of("backbones", _family(config["backbone"])),
        "plugin_versions": get_plugins().versions(),
    }
    if aliases:
        meta["aliases"] = aliases
    if extra_state:
        extra_tensors: dict[str, torch.Tensor] = {}
        try:
            meta["extra_state"] = pack(extra_state, extra_tensors)
        except TypeError as exc:
            raise NormzooError(f"cannot checkpoint the model's extra state: {exc}") from None
        tensors.update({f"{_EXTRA_PREFIX}{k}": v for k, v in extra_tensors.items()})
    metadata = {}
    if training_state is not None:
        clash = [k for k in tensors if k.startswith(EMBEDDED_STATE_PREFIX)]
        if clash:
            raise NormzooError(f"cannot embed the training state: the model has a key '{clash[0]}'")
        state_tensors, state_meta = training_state
        tensors.update({EMBEDDED_STATE_PREFIX + k: v for k, v in prepare_tensors(state_tensors).items()})
        metadata[EMBEDDED_STATE_KEY] = to_json(state_meta)
    for key, value in info.items():
        if key in RESERVED_KEYS and key in meta and meta[key] != value:
            raise NormzooError(f"checkpoint info['{key}'] = {value!r} conflicts with the value normzoo records "
                               f"({meta[key]!r})")
        meta[key] = value
    meta["tensors_sha256"] = tensors_digest(tensors)  # every tensor of the file, embedded state included
    try:
        metadata[METADATA_KEY] = to_json(meta)
    except (TypeError, ValueError) as exc:
        raise NormzooError(f"checkpoint info is not JSON-serializable: {exc}") from None
    return save_safetensors(path, tensors, metadata)


# -- reading ---------------------------------------------------------------------------------------------------
def _parse_metadata(header: Mapping[str, Any], path: Path) -> dict[str, Any]:
    meta = parse_normzoo_metadata(header_metadata(header), path, fmt=FORMAT, max_version=FORMAT_VERSION,
                                  key=METADATA_KEY)
    missing = [k for k in CONFIG_KEYS if k not in meta]
    if missing:
        raise NormzooError(f"checkpoint {path} is corrupt: its normzoo metadata lacks "
                           f"{', '.join(missing)}")
    bad = [k for k in ("backbone", "norm") if not isinstance(meta[k], str) or not meta[k].strip()]
    bad += [k for k in ("num_classes", "in_chans")
            if isinstance(meta[k], bool) or not isinstance(meta[k], int) or meta[k] < 1]
    if bad:
        raise NormzooError(f"checkpoint {path} is corrupt: bad {', '.join(bad)} in its normzoo metadata")
    return meta


def read_checkpoint_info(path: str | os.PathLike[str], *, tensors: bool = False) -> dict[str, Any]:
    """The metadata of a checkpoint, reading only the file's header (cheap; for ``normzoo inspect``).

    With ``tensors=True`` the result also has ``"tensors"``: name -> ``{"dtype", "shape"}`` and
    ``"num_parameters"`` (elements summed over the stored tensors).
    """
    path = Path(path)
    header = read_safetensors_header(path, what="checkpoint")
    meta = _parse_metadata(header, path)
    if tensors:
        entries = {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in sorted(header.items())
                   if _is_model_key(k)}
        meta["tensors"] = entries
        count = 0
        for entry in entries.values():
            n = 1
            for d in entry["shape"]:
                n *= d
            count += n
        meta["num_parameters"] = count
    return meta


def check_plugins(path: str | os.PathLike[str]) -> None:
    """A one-line error naming the plugin to install when the checkpoint's norm or backbone is not registered
    (reads only the header; ``normzoo run --resume`` asks before anything else)."""
    path = Path(path)
    _check_plugins(_parse_metadata(read_safetensors_header(path, what="checkpoint"), path), path)


def _check_plugins(meta: Mapping[str, Any], path: Path) -> None:
    """A one-line error naming the plugin to install when the norm or backbone family is not registered."""
    from normzoo.plugins import get_plugins

    plugins = get_plugins()
    problems = []
    for kind, key in (("norms", "norm"), ("backbones", "backbone")):
        family = clip(_family(str(meta[key])))
        if family in plugins.registry(kind):
            continue
        provider = meta.get(f"{key}_plugin") or {}
        provider = provider if isinstance(provider, dict) else {}
        name, version, dist = (clip(v) if v is not None else None for v in
                               (provider.get("name"), provider.get("version"),
                                provider.get("distribution") or provider.get("name")))
        if name is None:
            problems.append(f"{key} '{family}' is not registered by any installed plugin")
            continue
        saved = f" (version {version})" if version else ""
        loaded = plugins.info.get(name)
        if loaded is None:
            problems.append(f"{key} '{family}' comes from plugin '{name}'{saved}, which is not installed; "
                            f"pip install {dist}")
        elif loaded.errors:
            problems.append(f"{key} '{family}' comes from plugin '{name}'{saved}, which failed to load: "
                            f"{loaded.errors[0]}")
        else:
            problems.append(f"{key} '{family}' comes from plugin '{name}'{saved}, but the installed version "
                            f"{loaded.version} does not register it")
    if problems:
        raise NormzooError(f"cannot rebuild checkpoint {path}: " + "; ".join(problems))


def _describe_keys(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _check_fit(path: Path, meta: Mapping[str, Any], model_state: Mapping[str, Any],
               shapes: Mapping[str, tuple[int, ...] | None], renamed: Mapping[str, str]) -> None:
    """Missing/unexpected keys and shape mismatches between a checkpoint and a model, as one line."""
    expected = {renamed[k]: v for k, v in model_state.items()}
    missing = sorted(k for k in expected if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in expected)
    mismatched = []
    for key in sorted(set(shapes) & set(expected)):
        want = expected[key]
        have = shapes[key]
        if isinstance(want, torch.Tensor) and have is not None and tuple(want.shape) != tuple(have):
            mismatched.append(f"{key} {list(have)} in the checkpoint vs {list(want.shape)} in the model")
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)} ({_describe_keys(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)} "
                     f"({_describe_keys(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch{'es' * (len(mismatched) != 1)} "
                     f"({_describe_keys(mismatched, 3)})")
    raise NormzooError(f"checkpoint {path} does not fit the model (backbone '{clip(meta.get('backbone'))}', norm "
                       f"'{clip(meta.get('norm'))}'): " + "; ".join(parts))


def _stored_shapes(header: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """Key -> shape of the model state the file holds (aliases included, extra state shapeless)."""
    stored = {k: tuple(v["shape"]) for k, v in header.items() if _is_model_key(k)}
    shapes: dict[str, tuple[int, ...] | None] = {}
    for key, shape in stored.items():
        shapes[key] = shape
    for key, target in (meta.get("aliases") or {}).items():
        shapes[key] = stored.get(target)
    for key in _extra_state_keys(meta):
        shapes[key] = None
    renamed = strip_wrapper_prefixes(shapes)
    return {renamed[k]: v for k, v in shapes.items()}


def _extra_state_keys(meta: Mapping[str, Any]) -> list[str]:
    extra = meta.get("extra_state")
    return list(extra) if isinstance(extra, dict) else []


def _is_model_key(key: str) -> bool:
    return key != "__metadata__" and not key.startswith((_EXTRA_PREFIX, EMBEDDED_STATE_PREFIX))


def _verified_tensors(path: Path, meta: Mapping[str, Any], *, verify: bool) -> dict[str, torch.Tensor]:
    tensors = load_safetensors(path, what="checkpoint")
    expected = meta.get("tensors_sha256")
    if verify and expected is not None and tensors_digest(tensors) != expected:
        raise NormzooError(f"checkpoint {path} is corrupt: its tensor data does not match the checksum stored "
                           "when it was written")
    return tensors


def _read_state(path: Path, meta: Mapping[str, Any], *, verify: bool,
                tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    if tensors is None:
        tensors = _verified_tensors(path, meta, verify=verify)
    extra_tensors = {k[len(_EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(_EXTRA_PREFIX)}
    state: dict[str, Any] = {k: v for k, v in tensors.items() if _is_model_key(k)}
    for key, target in (meta.get("aliases") or {}).items():
        if target not in state:
            raise NormzooError(f"checkpoint {path} is corrupt: '{key}' is stored as an alias of '{target}', "
                               "which the file does not contain")
        state[key] = state[target]
    if meta.get("extra_state"):
        state.update(unpack(meta["extra_state"], extra_tensors))
    return _unwrapped_state_dict(state)


def _load_into(path: Path, model: nn.Module, header: Mapping[str, Any], meta: Mapping[str, Any], *,
               verify: bool, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
    model_state = model.state_dict()
    renamed = strip_wrapper_prefixes(model_state)  # load_weights may get a compiled/DDP-wrapped model
    _check_fit(path, meta, model_state, _stored_shapes(header, meta), renamed)
    state = _read_state(path, meta, verify=verify, tensors=tensors)
    original = {v: k for k, v in renamed.items()}
    try:
        model.load_state_dict({original[k]: v for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        message = " ".join(str(exc).split())
        raise NormzooError(f"checkpoint {path} does not fit the model: {message}") from None


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu", *,
                    verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes, load its weights strictly, and return ``(model, info)``.

    The model is in eval mode on ``device``; ``info`` is the checkpoint's metadata (see the module docstring).
    ``verify`` checks the tensors against the checksum stored at save time. The metadata is the file's word,
    not a fact: the model is first built on the ``meta`` device (no memory) and every key and shape compared
    with the tensors the file really holds, and only a model that fits is built for real.
    """
    path = Path(path)
    header = read_safetensors_header(path, what="checkpoint")
    meta = _parse_metadata(header, path)
    _check_plugins(meta, path)
    skeleton = _rebuild(path, meta, "meta")
    if skeleton is not None:
        model_state = skeleton.state_dict()
        _check_fit(path, meta, model_state, _stored_shapes(header, meta), strip_wrapper_prefixes(model_state))
        del skeleton, model_state
    model = _rebuild(path, meta, device)
    _load_into(path, model, header, meta, verify=verify)
    model.eval()
    return model, meta


def _rebuild(path: Path, meta: Mapping[str, Any], device: str | torch.device) -> nn.Module | None:
    """``build_model`` from the metadata on ``device``; on ``meta``, None for a builder that cannot build there."""
    from normzoo.models import build_model

    try:
        return build_model(meta["backbone"], meta["norm"], num_classes=int(meta["num_classes"]),
                           in_chans=int(meta["in_chans"]), device=device)
    except NormzooError as exc:
        raise NormzooError(f"cannot rebuild checkpoint {path} (backbone '{clip(meta['backbone'])}', norm "
                           f"'{clip(meta['norm'])}'): {exc}") from None
    except (NotImplementedError, RuntimeError, TypeError) as exc:
        if str(device) == "meta" and not is_out_of_memory(exc):  # then the shapes are checked after the build
            return None
        raise


def load_weights(path: str | os.PathLike[str], model: nn.Module, *, verify: bool = True,
                 check_config: bool = True) -> dict[str, Any]:
    """Load a checkpoint's weights strictly into an existing ``model`` (wrapped or not); return its info.

    For resuming a run whose model the caller has already built; the same one-line errors as
    :func:`load_checkpoint` when the file is bad or does not fit. With ``check_config`` (the default), a
    model carrying ``normzoo_config`` must have been built from the same backbone, norm, classes and input
    channels as the checkpoint (``lp:inf`` weights fit an ``lp:2`` model key for key, but are not its weights).
    """
    path = Path(path)
    header = read_safetensors_header(path, what="checkpoint")
    meta = _parse_metadata(header, path)
    if check_config:
        _check_same_model(path, meta, model)
    _load_into(path, model, header, meta, verify=verify)
    return meta


def _check_same_model(path: Path, meta: Mapping[str, Any], model: nn.Module) -> None:
    try:
        config = _model_config(model)
    except NormzooError:
        return
    differ = [f"{k} '{meta[k]}' vs '{config[k]}'" for k in CONFIG_KEYS if meta[k] != config[k]]
    if differ:
        raise NormzooError(f"checkpoint {path} was saved from another model than this one (checkpoint vs "
                           f"model: {'; '.join(differ)})")


def embedded_training_state(path: str | os.PathLike[str], *, tensors: Mapping[str, torch.Tensor] | None = None
                            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The training state a run checkpoint embeds: its tensors (prefix stripped) and its JSON part.

    The tensors are checked against the checksum of the whole file unless the caller passes ``tensors`` it has
    already read and checked.
    """
    from normzoo.state import FORMAT as STATE_FORMAT
    from normzoo.state import FORMAT_VERSION as STATE_VERSION

    path = Path(path)
    header = read_safetensors_header(path, what="checkpoint")
    metadata = header_metadata(header)
    if EMBEDDED_STATE_KEY not in metadata:
        raise NormzooError(f"{path} is a normzoo model checkpoint without training state (only a run's "
                           "last.safetensors carries it), so training cannot resume from it")
    state_meta = parse_normzoo_metadata(metadata, path, fmt=STATE_FORMAT, max_version=STATE_VERSION,
                                        key=EMBEDDED_STATE_KEY)
    if tensors is None:
        tensors = _verified_tensors(path, _parse_metadata(header, path), verify=True)
    state = {k[len(EMBEDDED_STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMBEDDED_STATE_PREFIX)}
    return state, state_meta


def load_run_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resume from a run checkpoint: its weights into ``model``, its embedded training state into ``optimizer``
    and the global RNGs, from one read of the file checked against its checksum. Returns ``(info, extra)``."""
    from normzoo.state import restore_training_state

    path = Path(path)
    header = read_safetensors_header(path, what="checkpoint")
    meta = _parse_metadata(header, path)
    _check_same_model(path, meta, model)
    tensors = _verified_tensors(path, meta, verify=True)
    state_tensors, state_meta = embedded_training_state(path, tensors=tensors)
    _load_into(path, model, header, meta, verify=True, tensors=tensors)
    return meta, restore_training_state(path, state_tensors, state_meta, optimizer)
