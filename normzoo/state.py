"""Exact resume from tensors and JSON only: optimizer state, RNG states and counters in one safetensors file.

The runner saves the model with :func:`normzoo.checkpoint.save_checkpoint` and this state next to it
(``last.safetensors`` + ``last.state.safetensors``). Tensors (momentum buffers, Adam moments and step counts,
RNG states) are stored as safetensors tensors; everything else (hyperparameters, python numbers, the
runner's counters) as JSON in the metadata, via :func:`normzoo.io.pack`, which keeps tuples, int keys and
non-finite floats exact. Loading a state into a fresh optimizer and continuing gives bit-identical training.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from normzoo.errors import NormzooError
from normzoo.io import (header_metadata, load_safetensors, pack, parse_normzoo_metadata, prepare_tensors,
                        read_safetensors_header, save_safetensors, tensors_digest, to_json, unpack)

FORMAT = "normzoo-training-state"
FORMAT_VERSION = 1
METADATA_KEY = "normzoo"


# -- optimizer -----------------------------------------------------------------------------------------------
def _class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer | Mapping[str, Any]
                               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-able dict.

    Tensors are named ``state.{param_index}.{key}`` (``state.0.momentum_buffer``, ``state.3.exp_avg``,
    ``state.3.step`` for Adam's tensor step); hyperparameters, python-number state entries and the parameter
    groups go into the JSON part. A plain state dict may be passed instead of an optimizer.
    """
    state_dict = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    packed = pack(dict(state_dict), tensors)
    meta = {"class": None if isinstance(optimizer, Mapping) else _class_name(optimizer), "state_dict": packed}
    return tensors, meta


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict that :func:`optimizer_state_to_tensors` split up, ready for ``load_state_dict``."""
    return unpack(meta["state_dict"], tensors)


# -- RNG -----------------------------------------------------------------------------------------------------
def rng_state_to_tensors() -> dict[str, torch.Tensor]:
    """Every global RNG state as tensors.

    ``torch.cpu`` (``torch.get_rng_state()``), ``torch.cuda.{i}`` for each CUDA device once CUDA is
    initialized (an uninitialized CUDA has drawn nothing yet, and initializing it here would cost a context),
    ``python.state``/``python.gauss`` (``random``) and ``numpy.key``/``numpy.pos``/``numpy.gauss`` (numpy's
    legacy global generator, when numpy is installed).
    """
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    tensors["python.state"] = torch.tensor([version, *internal], dtype=torch.int64)
    tensors["python.gauss"] = torch.tensor([] if gauss is None else [gauss], dtype=torch.float64)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return tensors
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    if kind == "MT19937":
        tensors["numpy.key"] = torch.from_numpy(key.astype(np.int64))
        tensors["numpy.pos"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
        tensors["numpy.gauss"] = torch.tensor([cached], dtype=torch.float64)
    return tensors


def restore_rng_state(tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state_to_tensors` captured (entries it lacks are left alone).

    CUDA states are restored for the devices present; saved states of devices this machine lacks are ignored.
    """
    if "torch.cpu" in tensors:
        torch.set_rng_state(tensors["torch.cpu"].to(torch.uint8))
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("torch.cuda."))
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        for i, state in cuda:
            if i < count:
                torch.cuda.set_rng_state(state.to(torch.uint8), i)
    if "python.state" in tensors:
        version, *internal = (int(v) for v in tensors["python.state"].tolist())
        gauss = tensors.get("python.gauss")
        gauss_next = float(gauss.item()) if gauss is not None and gauss.numel() else None
        random.setstate((version, tuple(internal), gauss_next))
    if "numpy.key" in tensors:
        import numpy as np

        pos, has_gauss = (int(v) for v in tensors["numpy.pos"].tolist())
        np.random.set_state(("MT19937", tensors["numpy.key"].numpy().astype(np.uint32), pos, has_gauss,
                             float(tensors["numpy.gauss"].item())))


# -- the state file ------------------------------------------------------------------------------------------
def training_state_parts(optimizer: torch.optim.Optimizer | None, *, extra: Mapping[str, Any] | None = None,
                         generators: Mapping[str, torch.Generator] | None = None,
                         rng: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The training state as named CPU tensors and a JSON-able dict (no checksum, nothing written).

    What :func:`save_training_state` writes to a file of its own, and what a run's checkpoint embeds next to
    the weights (``normzoo.checkpoint.save_checkpoint(..., training_state=...)``) so that the two can never
    be from different steps.
    """
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "normzoo_version": _version(),
                            "torch_version": torch.__version__}
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer)
        tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
        meta["optimizer"] = opt_meta
    else:
        meta["optimizer"] = None
    if rng:
        tensors.update({f"rng.{k}": v for k, v in rng_state_to_tensors().items()})
    for name, generator in (generators or {}).items():
        tensors[f"generator.{name}"] = generator.get_state()
    meta["generators"] = sorted(generators or {})
    extra_tensors: dict[str, torch.Tensor] = {}
    meta["extra"] = pack(dict(extra or {}), extra_tensors)
    tensors.update({f"extra.{k}": v for k, v in extra_tensors.items()})
    return prepare_tensors(tensors), meta  # CPU copies once, for both the checksum and the file


def save_training_state(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None, *,
                        extra: Mapping[str, Any] | None = None,
                        generators: Mapping[str, torch.Generator] | None = None,
                        rng: bool = True) -> Path:
    """Write the optimizer state, the global RNG states, named generators and ``extra`` to one file, atomically.

    ``extra`` is the caller's own state (step counters, a GradScaler's ``state_dict()``, ...): nested dicts,
    lists, tuples, numbers, strings and tensors; :func:`load_training_state` gives it back equal.
    """
    tensors, meta = training_state_parts(optimizer, extra=extra, generators=generators, rng=rng)
    meta["tensors_sha256"] = tensors_digest(tensors)
    return save_safetensors(path, tensors, {METADATA_KEY: to_json(meta)})


def read_training_state_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON part of a training-state file, or of the state a run's checkpoint embeds (header only)."""
    from normzoo.checkpoint import EMBEDDED_STATE_KEY

    header = read_safetensors_header(path, what="training state")
    metadata = header_metadata(header)
    key = EMBEDDED_STATE_KEY if EMBEDDED_STATE_KEY in metadata else METADATA_KEY
    return parse_normzoo_metadata(metadata, Path(path), fmt=FORMAT, max_version=FORMAT_VERSION, key=key)


def load_training_state(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer | None, *,
                        generators: Mapping[str, torch.Generator] | None = None,
                        restore_rng: bool = True) -> dict[str, Any]:
    """Load a file written by :func:`save_training_state`, or the state a run checkpoint embeds, and return its
    ``extra`` dict.

    Loads the optimizer state into ``optimizer`` (built for the same parameters), restores the global RNG
    states (unless ``restore_rng=False``) and the state of each generator in ``generators`` by name. The
    tensors are checked against the checksum stored when the file was written.
    """
    from normzoo.checkpoint import EMBEDDED_STATE_KEY, embedded_training_state

    path = Path(path)
    if EMBEDDED_STATE_KEY in header_metadata(read_safetensors_header(path, what="training state")):
        tensors, meta = embedded_training_state(path)
    else:
        meta = read_training_state_info(path)
        tensors = load_safetensors(path, what="training state")
        expected = meta.get("tensors_sha256")
        if expected is not None and tensors_digest(tensors) != expected:
            raise NormzooError(f"training state {path} is corrupt: its tensor data does not match the checksum "
                               "stored when it was written")
    return restore_training_state(path, tensors, meta, optimizer, generators=generators, restore_rng=restore_rng)


def restore_training_state(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                           optimizer: torch.optim.Optimizer | None, *,
                           generators: Mapping[str, torch.Generator] | None = None,
                           restore_rng: bool = True) -> dict[str, Any]:
    """Apply the parts :func:`training_state_parts` made (read back from ``path``); returns ``extra``."""
    groups = _split(tensors)
    if optimizer is not None:
        _load_optimizer(path, optimizer, meta.get("optimizer"), groups.get("optimizer", {}))
    for name, generator in (generators or {}).items():
        state = groups.get("generator", {}).get(name)
        if state is None:
            saved = ", ".join(meta.get("generators", [])) or "none"
            raise NormzooError(f"training state {path} has no state for generator '{name}' (saved: {saved})")
        generator.set_state(state)
    if restore_rng:
        restore_rng_state(groups.get("rng", {}))
    return unpack(meta.get("extra", {}), groups.get("extra", {}))


def _split(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        group, _, name = key.partition(".")
        groups.setdefault(group, {})[name] = value
    return groups


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer, meta: Mapping[str, Any] | None,
                    tensors: Mapping[str, torch.Tensor]) -> None:
    if meta is None:
        raise NormzooError(f"training state {path} holds no optimizer state")
    saved, wanted = meta.get("class"), _class_name(optimizer)
    if saved is not None and saved != wanted:
        raise NormzooError(f"training state {path} was saved from a {saved.rsplit('.', 1)[-1]} optimizer, "
                           f"not {wanted.rsplit('.', 1)[-1]}")
    state_dict = optimizer_state_from_tensors(tensors, meta)
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError, RuntimeError) as exc:
        message = " ".join(str(exc).split())
        raise NormzooError(f"training state {path} does not fit this optimizer: {message}") from None


def _version() -> str:
    from normzoo import __version__

    return __version__
