"""Atomic file writes and the safetensors reading/writing shared by checkpoints and training state.

Every write goes to a temporary file in the target's directory, is fsynced and then moved over the target with
``os.replace``, so a crash or an exception mid-write leaves either the old file or the new one, never half of
one (and no temporary file behind). Reading validates the safetensors header itself first, so a missing,
truncated, corrupt or foreign file (a ``torch.save`` zip, random bytes) gets a one-line :class:`NormzooError`
instead of a Rust panic message. Nothing here (or in ``checkpoint``/``state``) ever deserializes Python
objects: files hold tensors and JSON only.

Non-tensor state (optimizer hyperparameters, RNG bookkeeping, counters) travels as JSON next to the tensors:
:func:`pack` turns a nested structure of dicts, lists, tuples, numbers, strings and tensors into JSON plus a
dict of named tensors, and :func:`unpack` inverts it exactly (tuples stay tuples, int keys stay ints).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normzoo.errors import NormzooError

if TYPE_CHECKING:
    import torch

# safetensors' own limit on the header size; anything above it is not a safetensors file.
MAX_HEADER_BYTES = 100_000_000

_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


# -- atomic writes ---------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path next to ``path``, then move it into place.

    The temporary file is fsynced before ``os.replace`` and the directory after it. If ``write`` (or anything
    up to the replace) raises, the temporary file is removed, the old ``path`` is untouched, and the
    exception propagates. Parent directories are created. Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the umask gives a new file
        write(tmp)
        os.chmod(tmp, mode)  # a writer that recreates the file (safetensors makes it 0600) must not change it
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _create_temp(path: Path) -> Path:
    # O_EXCL with mode 0o666 lets the umask decide permissions, as for an ordinary new file.
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise OSError(f"could not create a temporary file next to {path}")


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON (plus a trailing newline) to ``path`` atomically.

    The object is serialized before anything touches the disk, so an unserializable value leaves no trace.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default) + "\n"
    return atomic_write_text(path, text)


def _json_default(value: Any) -> Any:
    """JSON for the values training code tends to hold: numpy/torch scalars and arrays, paths, sets."""
    if hasattr(value, "tolist") and hasattr(value, "shape"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def to_json(obj: Any) -> str:
    """Compact JSON (numpy/torch scalars and paths converted) for safetensors metadata values."""
    return json.dumps(obj, separators=(",", ":"), default=_json_default)


# -- safetensors ---------------------------------------------------------------------------------------------
def prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no memory with each other (what safetensors requires)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        t = tensor.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def save_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Save ``tensors`` (any device, shared or not) and str->str ``metadata`` to ``path`` atomically."""
    from safetensors.torch import save_file

    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {', '.join(map(str, bad))}")
    prepared = prepare_tensors(tensors)

    def write(tmp: Path) -> None:
        from safetensors import SafetensorError

        try:
            save_file(prepared, tmp, metadata=dict(metadata or {}))
        except SafetensorError as exc:  # its I/O errors are the system's: a full disk must read as one
            found = re.search(r"os error (\d+)", str(exc))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from exc

    return atomic_write(path, write)


def read_safetensors_header(path: str | os.PathLike[str], *, what: str = "file") -> dict[str, Any]:
    """The parsed, validated header of a safetensors file (tensor entries plus ``"__metadata__"``).

    Reads only the header, never the tensor data. ``what`` names the file in errors ("checkpoint", ...).
    Raises :class:`NormzooError` (one line) for a missing file, a file that is not safetensors, and a
    truncated or corrupt one.
    """
    path = Path(path)
    if not path.exists():
        raise NormzooError(f"{what} not found: {path}")
    if path.is_dir():
        raise NormzooError(f"{what} {path} is a directory, not a safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NormzooError(f"{what} {path} is not a safetensors file: it has only {size} bytes"
                                   + (" (empty)" if size == 0 else " (truncated?)"))
            (length,) = struct.unpack("<Q", head)
            plausible = 0 < length <= MAX_HEADER_BYTES
            first = f.read(1) if plausible else b""
            if plausible and first == b"":
                raise NormzooError(f"{what} {path} is truncated: it ends right after the header length")
            if first != b"{":  # every safetensors header is a JSON object
                _refuse_foreign(head, path, what)
                raise NormzooError(f"{what} {path} is not a safetensors file (it does not start with a header "
                                   "length and a JSON header)")
            raw = first + f.read(length - 1)
    except OSError as exc:
        raise NormzooError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(raw) < length:
        raise NormzooError(f"{what} {path} is truncated: its header needs {length} bytes but the file ends "
                           f"after {len(raw)}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise NormzooError(f"{what} {path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise NormzooError(f"{what} {path} is corrupt: its safetensors header is not a JSON object")
    _validate_header(header, size - 8 - length, path, what)
    return header


def _refuse_foreign(head: bytes, path: Path, what: str) -> None:
    if head.startswith(b"PK\x03\x04"):
        raise NormzooError(f"{what} {path} is a zip archive (torch.save output?), not a safetensors file; "
                           "normzoo reads only safetensors and never executes Python objects from files")
    if head[:1] == b"\x80" and head[1:2] in {bytes([v]) for v in range(2, 6)}:
        raise NormzooError(f"{what} {path} is a serialized Python object (old torch.save output?), not a "
                           "safetensors file; normzoo reads only safetensors")


def _validate_header(header: dict[str, Any], data_len: int, path: Path, what: str) -> None:
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NormzooError(f"{what} {path} is corrupt: its safetensors metadata is not a str->str mapping")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise NormzooError(f"{what} {path} is corrupt: bad safetensors header entry for '{name}'")
        if dtype in _DTYPE_BYTES and stop - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise NormzooError(f"{what} {path} is corrupt: tensor '{name}' has {stop - begin} bytes for shape "
                               f"{list(shape)} of {dtype}")
        end = max(end, stop)
    if end > data_len:
        raise NormzooError(f"{what} {path} is truncated: its header describes {end} bytes of tensor data but "
                           f"only {max(data_len, 0)} are present")
    if end < data_len:
        raise NormzooError(f"{what} {path} is corrupt: {data_len - end} bytes follow the tensor data")


def header_metadata(header: Mapping[str, Any]) -> dict[str, str]:
    return dict(header.get("__metadata__", {}))


# What each normzoo file format is called in messages, and how to read it (for a file of the other kind).
FORMAT_NAMES = {
    "normzoo-checkpoint": ("normzoo model checkpoint", "normzoo.load_checkpoint"),
    "normzoo-training-state": ("normzoo training-state file", "normzoo.state.load_training_state"),
}


def parse_normzoo_metadata(metadata: Mapping[str, str], path: Path, *, fmt: str, max_version: int,
                           key: str = "normzoo") -> dict[str, Any]:
    """The JSON envelope every normzoo safetensors file carries under ``key``, checked to be of format ``fmt``.

    Returns the decoded dict with an integer ``format_version`` in ``[1, max_version]``; anything else is one
    clear :class:`NormzooError` (no metadata, invalid JSON, the other normzoo format, a newer version).
    """
    name = FORMAT_NAMES[fmt][0]
    raw = metadata.get(key)
    if raw is None:
        raise NormzooError(f"{path} is a safetensors file without normzoo metadata (not written by normzoo), "
                           f"so it is not a {name}")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise NormzooError(f"{path} is corrupt: its normzoo metadata is not valid JSON") from None
    kind = meta.get("format") if isinstance(meta, dict) else None
    if kind != fmt:
        other = FORMAT_NAMES.get(kind) if isinstance(kind, str) else None
        hint = f" (it is a {other[0]}; use {other[1]})" if other else ""
        raise NormzooError(f"{path} is not a {name}{hint}")
    try:
        version = int(meta.get("format_version", 0))
    except (TypeError, ValueError):
        version = 0
    if version > max_version:
        raise NormzooError(f"{path} has {name} format version {version}, newer than this normzoo reads "
                           f"({max_version}); upgrade normzoo")
    if version < 1:
        raise NormzooError(f"{path} is corrupt: its normzoo metadata lacks a valid format_version")
    meta["format_version"] = version
    return meta


def load_safetensors(path: str | os.PathLike[str], *, what: str = "file") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU; validated first (see :func:`read_safetensors_header`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path, what=what)
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        message = " ".join(str(exc).split())
        raise NormzooError(f"{what} {path} is corrupt: {message}") from None


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order (detects corrupt tensor data)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


# -- nested state <-> JSON + named tensors -----------------------------------------------------------------
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__")


def pack(obj: Any, tensors: dict[str, torch.Tensor], name: str = "") -> Any:
    """JSON-able form of ``obj``; its tensors go into ``tensors`` under dotted names starting with ``name``.

    Handles dicts (any hashable JSON-able keys), lists, tuples, None, bool, int, float (inf/nan included),
    str, numpy scalars and arrays, and tensors. :func:`unpack` gives back an equal structure.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        return {"__tensor__": _add_tensor(tensors, name, obj)}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, _join(name, i)) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, _join(name, i)) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
            return {k: pack(v, tensors, _join(name, k)) for k, v in obj.items()}
        return {"__dict__": [[pack(k, tensors, _join(name, f"key{i}")), pack(v, tensors, _join(name, k))]
                             for i, (k, v) in enumerate(obj.items())]}
    module = type(obj).__module__
    if module == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {"__ndarray__": _add_tensor(tensors, name, torch.from_numpy(obj.copy()))}
        if isinstance(obj, np.generic):
            return pack(obj.item(), tensors, name)
    raise TypeError(f"cannot store '{name or '<root>'}' of type {type(obj).__name__} (allowed: dict, list, "
                    "tuple, None, bool, int, float, str, tensors, numpy arrays)")


def unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Invert :func:`pack`: ``unpack(pack(x, t), t) == x`` (tensors come back as the given tensors)."""
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, value), = obj.items()
            if tag in _TAGS:
                if tag == "__tensor__":
                    return _get_tensor(tensors, value)
                if tag == "__ndarray__":
                    return _get_tensor(tensors, value).numpy()
                if tag == "__tuple__":
                    return tuple(unpack(v, tensors) for v in value)
                if tag == "__dict__":
                    return {_hashable(unpack(k, tensors)): unpack(v, tensors) for k, v in value}
                return float(value)
        return {k: unpack(v, tensors) for k, v in obj.items()}
    return obj


def _join(name: str, part: object) -> str:
    return f"{name}.{part}" if name else str(part)


def _add_tensor(tensors: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> str:
    key, n = name or "tensor", 1
    while key in tensors:
        n += 1
        key = f"{name}#{n}"
    tensors[key] = tensor
    return key


def _get_tensor(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise NormzooError(f"stored state refers to tensor '{key}', which the file does not contain") from None


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key
