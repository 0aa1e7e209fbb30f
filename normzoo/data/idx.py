"""MNIST and Fashion-MNIST from their idx files (LeCun's format, optionally gzipped), read with numpy.

The idx format: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, one big-endian
int32 per dimension, then the values in C order. Files are looked for in ``data_dir`` (and the subfolders
that torchvision and common layouts use), then, for Fashion-MNIST, in the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), then downloaded with torchvision.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from normzoo.data.dataset import Dataset, from_uint8_images, resolve_data_dir
from normzoo.errors import NormzooError
from normzoo.spec import Pad

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# name -> (pretty name, subfolders of data_dir to try first, system folders, torchvision class, classes)
_KINDS = {
    "mnist": ("MNIST", ("mnist", "MNIST", "mnist/raw", "MNIST/raw"), (), "MNIST", MNIST_CLASSES),
    "fashion-mnist": ("Fashion-MNIST",
                      ("fashion-mnist", "fashion_mnist", "FashionMNIST", "fashion-mnist/raw", "FashionMNIST/raw"),
                      (DEBIAN_FASHION_MNIST,), "FashionMNIST", FASHION_MNIST_CLASSES),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (``.gz`` or plain) of unsigned bytes into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise NormzooError(f"cannot read idx file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise NormzooError(f"{path} is not an idx file (bad magic number)")
    if raw[2] != 0x08:
        raise NormzooError(f"{path}: idx type 0x{raw[2]:02x} is not supported (only unsigned bytes, 0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise NormzooError(f"{path} is truncated (header)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count:
        raise NormzooError(f"{path} holds {len(raw) - header} values, its header declares {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (the plain file wins)."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def has_idx_files(folder: Path) -> bool:
    return all(find_file(folder, stem) is not None for pair in SPLIT_FILES.values() for stem in pair)


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of ``split`` ("train" or "test") in ``folder``."""
    images_stem, labels_stem = SPLIT_FILES[split]
    images = read_idx(find_file(folder, images_stem) or folder / images_stem)
    labels = read_idx(find_file(folder, labels_stem) or folder / labels_stem)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise NormzooError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def candidate_folders(kind: str, data_dir: Path) -> list[Path]:
    """Where ``kind`` is looked for, in order: dataset-specific subfolders of data_dir, data_dir, system."""
    _, subfolders, system, _, _ = _KINDS[kind]
    return [*(data_dir / s for s in subfolders), data_dir, *system]


def locate(kind: str, data_dir: Path, *, download: bool) -> Path:
    """The folder holding ``kind``'s four idx files, downloading them with torchvision if allowed."""
    pretty, _, _, tv_class, _ = _KINDS[kind]
    folders = candidate_folders(kind, data_dir)
    for folder in folders:
        if has_idx_files(folder):
            return folder
    looked = ", ".join(str(f) for f in folders)
    if not download:
        raise NormzooError(f"{kind}: no {pretty} idx files (train-images-idx3-ubyte[.gz] ...) in {looked}; "
                           f"drop download=false to fetch them with torchvision, or pass --data-dir pointing at "
                           "a folder that has them")
    try:
        import torchvision.datasets

        getattr(torchvision.datasets, tv_class)(root=str(data_dir), train=True, download=True)
    except Exception as exc:  # offline, unwritable folder, mirror down: one clear line, never a fallback
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise NormzooError(f"{kind}: no {pretty} idx files in {looked}, and the torchvision download into "
                           f"{data_dir / tv_class / 'raw'} failed ({reason}); pass --data-dir pointing at a "
                           "folder with train-images-idx3-ubyte[.gz] and the other three idx files") from None
    folder = data_dir / tv_class / "raw"
    if not has_idx_files(folder):
        raise NormzooError(f"{kind}: torchvision reported a download but {folder} lacks the idx files")
    return folder


def pad_images(images: np.ndarray, pad: int) -> np.ndarray:
    """Zero-pad (N, H, W) images by ``pad`` pixels on every side (28x28 -> 32x32 for pad=2)."""
    if pad < 0:
        raise NormzooError(f"pad must be ≥ 0, got {pad}")
    if pad == 0:
        return images
    return np.pad(images, ((0, 0), (pad, pad), (pad, pad)))


def load_idx_dataset(kind: str, *, data_dir: str | None, pad: int, download: bool) -> Dataset:
    """Load ``kind`` ("mnist" or "fashion-mnist") as a normalised 1-channel :class:`Dataset`."""
    root = resolve_data_dir(data_dir)
    folder = locate(kind, root, download=download)
    train_images, train_labels = read_split(folder, "train")
    test_images, test_labels = read_split(folder, "test")
    return from_uint8_images(
        kind,
        pad_images(train_images, pad)[:, None], train_labels,
        pad_images(test_images, pad)[:, None], test_labels,
        classes=_KINDS[kind][4], source=str(folder),
    )


def mnist(*, data_dir: str | None = None, pad: Pad = 2, download: bool = True) -> Dataset:
    """MNIST digits (60k train / 10k test), 1 channel, zero-padded by ``pad`` px (28 -> 32 so that CIFAR
    backbones with five 2x poolings apply), normalised with the train set's mean and std."""
    return load_idx_dataset("mnist", data_dir=data_dir, pad=pad, download=download)


def fashion_mnist(*, data_dir: str | None = None, pad: Pad = 2, download: bool = True) -> Dataset:
    """Fashion-MNIST (60k train / 10k test, Zalando, MIT licence), 1 channel, zero-padded by ``pad`` px
    (28 -> 32 so that CIFAR backbones with five 2x poolings apply), normalised with the train set's statistics.
    Looked for in data_dir, then the Debian package folder /usr/share/datasets/fashion-mnist, then downloaded."""
    return load_idx_dataset("fashion-mnist", data_dir=data_dir, pad=pad, download=download)
