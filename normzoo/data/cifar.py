"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009), read with numpy, never with a general unpickler.

Two on-disk layouts are understood, looked for in ``data_dir`` (or ``data_dir`` may be the folder itself):

- the official **binary** version (``cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``data_batch_5.bin``,
  ``test_batch.bin``, ``batches.meta.txt``; ``cifar-100-binary/``: ``train.bin``, ``test.bin``,
  ``fine_label_names.txt``, ``coarse_label_names.txt``). Each record is the label byte (CIFAR-100: the coarse
  then the fine label byte) followed by 3072 pixel bytes: 1024 red, 1024 green, 1024 blue, rows of 32;
- torchvision's **python** version (``cifar-10-batches-py/``, ``cifar-100-python/``), whose files are pickles of
  dicts of numpy arrays. They are read with :func:`restricted_unpickle`, which can rebuild numpy arrays and
  nothing else.

When neither is found and ``download`` is true, the official binary tarball is fetched into ``data_dir`` with
torchvision's ``download_and_extract_archive`` (md5-checked). A failed download is an error, never a fallback.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from normzoo.data.dataset import Dataset, from_uint8_images, resolve_data_dir
from normzoo.errors import NormzooError

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    name: str  # registry name
    pretty: str
    bin_folder: str
    py_folder: str
    bin_train: tuple[str, ...]
    bin_test: str
    py_train: tuple[str, ...]
    py_test: str
    label_bytes: int
    url: str
    md5: str


CIFAR10 = CifarLayout(
    "cifar10", "CIFAR-10", "cifar-10-batches-bin", "cifar-10-batches-py",
    tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin",
    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
    1, "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
)
CIFAR100 = CifarLayout(
    "cifar100", "CIFAR-100", "cifar-100-binary", "cifar-100-python",
    ("train.bin",), "test.bin", ("train",), "test",
    2, "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8",
)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# -- the restricted unpickler ----------------------------------------------------------------------------------

def _allowed_globals() -> dict[tuple[str, str], Any]:
    import codecs

    try:  # numpy >= 2 keeps the implementation in numpy._core; numpy.core is a deprecated alias
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 pickles of bytes at protocol <= 2 call codecs.encode(text, "latin1"): a pure function.
        ("_codecs", "encode"): codecs.encode,
    }
    for module in ("numpy.core", "numpy._core"):
        # ndarray.__reduce__ (protocols 0-4; the CIFAR files were written by Python 2 at protocol 2)
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        # ndarray.__reduce_ex__ at protocol 5
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file, encoding="latin1")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only numpy arrays may be unpickled here") from None


def restricted_unpickle(path: str | Path) -> Any:
    """Load one of torchvision's CIFAR pickles, allowing only what rebuilds numpy arrays.

    Why: an ordinary ``pickle.load`` runs whatever callables the file names (``os.system`` included), so a
    tampered or malicious ``data_batch_1`` in a downloaded folder could execute code. These files only ever
    hold dicts, lists, strings, ints and numpy arrays, so :class:`_NumpyOnlyUnpickler` resolves exactly the
    globals numpy uses to rebuild an array (``numpy[._]core.multiarray._reconstruct``, ``numpy.ndarray``,
    ``numpy.dtype``, the protocol-5 ``numpy[._]core.numeric._frombuffer`` and ``_codecs.encode`` for bytes)
    and raises :class:`pickle.UnpicklingError` for any other. ``encoding="latin1"`` reads the Python 2 pickles
    the official tarball ships (byte strings become ``str``; numpy decodes its buffers from latin-1).
    """
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


# -- readers ---------------------------------------------------------------------------------------------------

def _key(d: dict[Any, Any], name: str) -> Any:
    """``d[name]`` whether the pickle stored the key as ``str`` or ``bytes``."""
    if name in d:
        return d[name]
    if name.encode() in d:
        return d[name.encode()]
    raise KeyError(name)


def _read_bin(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` label bytes + 3072 pixel bytes -> (N, 3, 32, 32) uint8, (N, label_bytes) labels."""
    record = label_bytes + PIXELS
    if not path.is_file():
        raise NormzooError(f"missing CIFAR file {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise NormzooError(f"{path} has {raw.size} bytes, not a whole number of {record}-byte CIFAR records")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), rows[:, :label_bytes]


def _read_names(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _read_py(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise NormzooError(f"missing CIFAR file {path}")
    try:
        batch = restricted_unpickle(path)
        data = np.asarray(_key(batch, "data"), dtype=np.uint8)
        labels = np.asarray(_key(batch, label_key), dtype=np.int64)
    except pickle.UnpicklingError as exc:
        raise NormzooError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, EOFError) as exc:
        raise NormzooError(f"{path} is not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if data.ndim != 2 or data.shape[1] != PIXELS or len(data) != len(labels):
        raise NormzooError(f"{path}: data {data.shape} and {label_key} {labels.shape} are not CIFAR batches")
    return data.reshape(-1, 3, 32, 32), labels


def _looks_like(folder: Path, files: tuple[str, ...]) -> bool:
    return all((folder / f).is_file() for f in files)


def locate(layout: CifarLayout, data_dir: Path) -> tuple[str, Path] | None:
    """``("bin" | "py", folder)`` of the first complete copy found, or None. Binary is preferred."""
    for kind, folder_name, files in (("bin", layout.bin_folder, (*layout.bin_train, layout.bin_test)),
                                     ("py", layout.py_folder, (*layout.py_train, layout.py_test))):
        for folder in (data_dir / folder_name, data_dir):
            if _looks_like(folder, files):
                return kind, folder
    return None


def _download(layout: CifarLayout, data_dir: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(layout.url, download_root=str(data_dir), md5=layout.md5)


def load_cifar(layout: CifarLayout, *, data_dir: str | None, download: bool,
               label_type: str = "fine") -> Dataset:
    root = resolve_data_dir(data_dir)
    found = locate(layout, root)
    looked = f"{root / layout.bin_folder}, {root / layout.py_folder} and {root}"
    how = (f"download {layout.url} and extract it into {root}, or pass --data-dir pointing at an existing "
           f"{layout.py_folder} or {layout.bin_folder} folder (or the folder holding it)")
    if found is None and not download:
        raise NormzooError(f"{layout.name}: no {layout.pretty} data in {looked} (download=false); {how}")
    if found is None:
        try:
            _download(layout, root)
        except Exception as exc:  # offline, unwritable folder, bad checksum: one clear line, never a fallback
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise NormzooError(f"{layout.name}: no {layout.pretty} data in {looked}, and downloading failed "
                               f"({reason}); {how}") from None
        found = locate(layout, root)
        if found is None:
            raise NormzooError(f"{layout.name}: downloaded {layout.url} but found no complete "
                               f"{layout.bin_folder} folder in {root}")
    kind, folder = found

    if kind == "bin":
        parts = [_read_bin(folder / f, layout.label_bytes) for f in layout.bin_train]
        train_x = np.concatenate([p[0] for p in parts])
        train_l = np.concatenate([p[1] for p in parts])
        test_x, test_l = _read_bin(folder / layout.bin_test, layout.label_bytes)
        column = 0 if layout.label_bytes == 1 or label_type == "coarse" else 1
        train_y, test_y = train_l[:, column].astype(np.int64), test_l[:, column].astype(np.int64)
        if layout is CIFAR10:
            classes = _read_names(folder / "batches.meta.txt")
        else:
            classes = _read_names(folder / f"{label_type}_label_names.txt")
    else:
        label_key = "labels" if layout is CIFAR10 else f"{label_type}_labels"
        parts = [_read_py(folder / f, label_key) for f in layout.py_train]
        train_x = np.concatenate([p[0] for p in parts])
        train_y = np.concatenate([p[1] for p in parts])
        test_x, test_y = _read_py(folder / layout.py_test, label_key)
        meta_name, names_key = (("batches.meta", "label_names") if layout is CIFAR10
                                else ("meta", f"{label_type}_label_names"))
        classes = []
        if (folder / meta_name).is_file():
            try:
                classes = [str(c) for c in _key(restricted_unpickle(folder / meta_name), names_key)]
            except (pickle.UnpicklingError, KeyError, TypeError, EOFError) as exc:
                raise NormzooError(f"{folder / meta_name}: cannot read class names ({exc})") from None

    num_classes = 10 if layout is CIFAR10 else (20 if label_type == "coarse" else 100)
    if layout is CIFAR10 and not classes:
        classes = list(CIFAR10_CLASSES)
    if classes and len(classes) != num_classes:
        raise NormzooError(f"{folder}: {len(classes)} class names, expected {num_classes}")
    for split, labels in (("train", train_y), ("test", test_y)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise NormzooError(f"{folder}: {split} labels outside [0, {num_classes})")
    name = layout.name if layout is CIFAR10 or label_type == "fine" else f"{layout.name}-coarse"
    return from_uint8_images(name, train_x, train_y, test_x, test_y, classes=classes,
                             source=str(folder), num_classes=num_classes)


def cifar10(*, data_dir: str | None = None, download: bool = True) -> Dataset:
    """CIFAR-10: 50k train / 10k test 32x32 RGB images in 10 classes, normalised with the train statistics."""
    return load_cifar(CIFAR10, data_dir=data_dir, download=download)


def cifar100(*, data_dir: str | None = None, download: bool = True,
             labels: Literal["fine", "coarse"] = "fine") -> Dataset:
    """CIFAR-100: 50k train / 10k test 32x32 RGB images, 100 fine classes (or 20 coarse superclasses)."""
    return load_cifar(CIFAR100, data_dir=data_dir, download=download, label_type=labels)
