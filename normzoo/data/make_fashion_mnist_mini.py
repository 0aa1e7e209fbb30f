"""Regenerate ``normzoo/data/fashion_mnist_mini.npz``, the real Fashion-MNIST subset bundled with normzoo.

Usage (from a checkout, with the full Fashion-MNIST idx files at hand)::

    python -m normzoo.data.make_fashion_mnist_mini                 # source: /usr/share/datasets/fashion-mnist
    python -m normzoo.data.make_fashion_mnist_mini --source DIR --out PATH
    python -m normzoo.data.make_fashion_mnist_mini --check         # rebuild in memory, compare with the file

How the subset is chosen (no random-number generator, so it cannot drift between numpy versions): for each
split (``train``, ``test``) and each class ``c`` in 0..9, the indices ``i`` of that class in the official
split are ordered by ``sha256(f"fashion-mnist-mini:{SEED}:{split}:{i}")`` (bytes, compared
lexicographically) and the first ``PER_CLASS[split]`` are kept (1000 per class for train, 200 for test: 10,000
+ 2,000 images, class-balanced). The kept indices are sorted ascending; images and labels are stored in that
order, and the indices themselves are stored as ``train_index``/``test_index`` (positions in the official
60,000-image train and 10,000-image test sets) so each image can be traced back to its source.

The archive is a ``.npz`` (zip of ``.npy`` files, deflate level 9, fixed timestamps, so a rebuild is
byte-identical): ``train_images`` (10000, 28, 28) uint8, ``train_labels`` (10000,) uint8, ``train_index``
(10000,) int32, the same three for ``test``, ``classes`` (10,) str, and ``provenance`` (a str: this recipe and
the SHA-256 of the four source files). It loads with ``np.load(path, allow_pickle=False)``.
Fashion-MNIST is © 2017 Zalando SE, MIT licence; see ``LICENSE-fashion-mnist.txt`` next to the archive.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

from normzoo.data.idx import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, SPLIT_FILES, find_file, read_split

SEED = 0
PER_CLASS = {"train": 1000, "test": 200}
OUTPUT = Path(__file__).with_name("fashion_mnist_mini.npz")
_EPOCH = (1980, 1, 1, 0, 0, 0)


def select(labels: np.ndarray, split: str, per_class: int, seed: int = SEED) -> np.ndarray:
    """The kept indices of one split, sorted ascending (see the module docstring for the rule)."""
    kept = []
    for c in range(10):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"{split}: class {c} has only {len(members)} images, need {per_class}")
        keys = [hashlib.sha256(f"fashion-mnist-mini:{seed}:{split}:{i}".encode()).digest() for i in members]
        order = sorted(range(len(members)), key=keys.__getitem__)
        kept.extend(int(members[j]) for j in order[:per_class])
    return np.array(sorted(kept), dtype=np.int32)


def build(source: Path) -> bytes:
    """The bytes of the archive built from the full idx files in ``source``."""
    arrays: dict[str, np.ndarray] = {}
    digests = []
    for split in ("train", "test"):
        images, labels = read_split(source, split)
        index = select(labels, split, PER_CLASS[split])
        arrays[f"{split}_images"] = np.ascontiguousarray(images[index])
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[index])
        arrays[f"{split}_index"] = index
        for stem in SPLIT_FILES[split]:
            path = find_file(source, stem)
            assert path is not None
            digests.append(f"{path.name} sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")
    arrays["classes"] = np.array(FASHION_MNIST_CLASSES)
    arrays["provenance"] = np.array(
        "Real Fashion-MNIST subset (Zalando SE 2017, MIT licence), built by normzoo.data.make_fashion_mnist_mini: "
        f"per split and class, the indices ordered by sha256('fashion-mnist-mini:{SEED}:<split>:<index>'), first "
        f"{PER_CLASS['train']} (train) / {PER_CLASS['test']} (test) per class kept, sorted ascending. "
        "Sources: " + "; ".join(digests)
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEBIAN_FASHION_MNIST,
                        help="folder with the four Fashion-MNIST idx files (.gz or plain)")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="archive to write")
    parser.add_argument("--check", action="store_true", help="compare a rebuild with --out instead of writing")
    args = parser.parse_args(argv)
    data = build(args.source)
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == data
        print(f"{args.out}: {'identical to' if same else 'DIFFERS from'} a rebuild from {args.source}")
        return 0 if same else 1
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
