"""``fashion-mnist-mini``: the real Fashion-MNIST subset bundled in the package, the offline quick-start default.

10,000 train / 2,000 test images (1,000 / 200 per class) of the real Fashion-MNIST, chosen deterministically
and stored in ``fashion_mnist_mini.npz`` next to this file; ``make_fashion_mnist_mini.py`` documents exactly
how and rebuilds it byte for byte. Fashion-MNIST is © 2017 Zalando SE, MIT licence
(``LICENSE-fashion-mnist.txt``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from normzoo.data.dataset import Dataset, from_uint8_images
from normzoo.data.idx import FASHION_MNIST_CLASSES, pad_images
from normzoo.errors import NormzooError
from normzoo.spec import Pad

MINI_PATH = Path(__file__).with_name("fashion_mnist_mini.npz")


def read_mini(path: Path = MINI_PATH) -> dict[str, np.ndarray]:
    """Every array of the bundled archive (images, labels, source indices, classes, provenance)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise NormzooError(f"fashion-mnist-mini: the bundled file {path} is missing from this installation; "
                           "rebuild it with `python -m normzoo.data.make_fashion_mnist_mini` or use "
                           "--dataset fashion-mnist") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise NormzooError(f"fashion-mnist-mini: cannot read {path} ({exc})") from None


def fashion_mnist_mini(*, data_dir: str | None = None, pad: Pad = 2) -> Dataset:
    """A bundled, class-balanced 10k/2k subset of the real Fashion-MNIST (works offline, loads in well
    under a second), 1 channel, zero-padded by ``pad`` px (28 -> 32) and normalised with its train statistics.
    ``data_dir`` is ignored."""
    arrays = read_mini()
    dataset = from_uint8_images(
        "fashion-mnist-mini",
        pad_images(arrays["train_images"], pad)[:, None], arrays["train_labels"],
        pad_images(arrays["test_images"], pad)[:, None], arrays["test_labels"],
        classes=[str(c) for c in arrays.get("classes", FASHION_MNIST_CLASSES)], source=str(MINI_PATH),
    )
    dataset.extra["train_index"] = arrays["train_index"]
    dataset.extra["test_index"] = arrays["test_index"]
    return dataset
