"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009), read with numpy, never with a general unpickler.

Two on-disk layouts are understood, looked for in ``data_dir`` (or ``data_dir`` may be the folder itself):

- the official **binary** version (``cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``data_batch_5.bin``,
  ``test_batch.bin``, ``batches.meta.txt``; ``cifar-100-binary/``: ``train.bin``, ``test.bin``,
  ``fine_label_names.txt``, ``coarse_label_names.txt``). Each record is the label byte (CIFAR-100: the coarse
  then the fine label byte) followed by 3072 pixel bytes: 1024 red, 1024 green, 1024 blue, rows of 32;
- torchvision's **python** version (``cifar-10-batches-py/``, ``cifar-100-python/``), whose files are pickles of
  dicts of numpy arrays. They are read without unpickling (:mod:`normzoo.data.pickle_reader` walks the opcodes
  as data), and only the exact types the real files use are accepted: a ``uint8`` image array of 3072 columns,
  integer labels, string keys and class names.

When neither is found and ``download`` is true, the official binary tarball is fetched into ``data_dir`` with
torchvision's ``download_and_extract_archive`` (md5-checked). A failed download is an error, never a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from normzoo.data.dataset import Dataset, from_uint8_images, resolve_data_dir
from normzoo.data.pickle_reader import read_pickled_data
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
    """Images (N, 3, 32, 32) and labels of a python-version batch: exactly what the real files hold, or an error."""
    if not path.is_file():
        raise NormzooError(f"missing CIFAR file {path}")
    batch = read_pickled_data(path)
    if not isinstance(batch, dict):
        raise NormzooError(f"{path} is not a CIFAR python batch (it holds a {type(batch).__name__}, not a dict)")
    try:
        data, labels = _key(batch, "data"), _key(batch, label_key)
    except KeyError as exc:
        raise NormzooError(f"{path} is not a CIFAR python batch (no {exc} entry)") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        what = f"{data.dtype} array of shape {list(data.shape)}" if isinstance(data, np.ndarray) else \
            type(data).__name__
        raise NormzooError(f"{path}: 'data' is a {what}, not the uint8 (N, {PIXELS}) array of a CIFAR batch")
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.ndim == 1:
        labels = labels.astype(np.int64)
    elif isinstance(labels, list) and all(type(v) is int for v in labels):
        labels = np.asarray(labels, dtype=np.int64)
    else:
        raise NormzooError(f"{path}: '{label_key}' is not a list of integer labels")
    if len(data) != len(labels):
        raise NormzooError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(path: Path, key: str) -> list[str]:
    meta = read_pickled_data(path)
    try:
        names = _key(meta, key) if isinstance(meta, dict) else None
    except KeyError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise NormzooError(f"{path}: no list of class names under '{key}'")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


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
            classes = _class_names(folder / meta_name, names_key)

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
