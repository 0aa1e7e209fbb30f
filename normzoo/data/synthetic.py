"""Synthetic, learnable random images for tests and smoke runs (no files, no download)."""

from __future__ import annotations

import numpy as np

from normzoo.data.dataset import Dataset, check_fits_in_memory, safe_std
from normzoo.errors import NormzooError
from normzoo.spec import Channels, Classes, Count, PositiveInt, Seed, Side


def synthetic(*, data_dir: str | None = None, n: PositiveInt = 256, n_test: Count = 64, size: Side = 32,
              channels: Channels = 3, classes: Classes = 10, seed: Seed = 0) -> Dataset:
    """Random ``channels x size x size`` images in ``classes`` classes that a small network learns quickly.

    Each class has a smooth prototype (a 4x4 standard-normal pattern per channel, upsampled by repetition);
    an image is its class prototype plus independent N(0, 1) pixel noise. Labels are balanced (``i % classes``,
    shuffled). The prototypes, the train set and the test set use separate random streams spawned from
    ``seed``, so changing ``n`` does not change the test set. Normalised per channel with the train statistics.
    ``data_dir`` is ignored.
    """
    import torch

    for name, value, low in (("n", n, 1), ("n_test", n_test, 0), ("size", size, 1), ("channels", channels, 1),
                             ("classes", classes, 1)):
        if value < low:
            raise NormzooError(f"synthetic: {name} must be ≥ {low}, got {value}")
    # float64 images plus the prototypes gathered for them: two copies while the set is made
    check_fits_in_memory("synthetic", (n + n_test) * channels * size * size * 16)
    proto_rng, train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    coarse = min(4, size)
    cells = (np.arange(size) * coarse) // size  # pixel -> 4x4 cell
    prototypes = proto_rng.standard_normal((classes, channels, coarse, coarse))[:, :, cells][:, :, :, cells]

    def make(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(count) % classes)
        images = prototypes[labels] + rng.standard_normal((count, channels, size, size))
        return images, labels

    train_x, train_y = make(n, train_rng)
    test_x, test_y = make(n_test, test_rng)
    mean = train_x.mean(axis=(0, 2, 3))
    std = safe_std(train_x.std(axis=(0, 2, 3)))

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x - mean[:, None, None]) / std[:, None, None]).astype(np.float32))

    return Dataset(
        name="synthetic",
        train_x=tensor(train_x), train_y=torch.from_numpy(train_y.astype(np.int64)),
        test_x=tensor(test_x), test_y=torch.from_numpy(test_y.astype(np.int64)),
        num_classes=classes, input_shape=(channels, size, size), classes=[f"class{i}" for i in range(classes)],
        source=f"generated (seed {seed})", mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
    )
