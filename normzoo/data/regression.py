"""Gaussian linear regression ``y = A x`` for the deep linear network (Santurkar et al. 2018, §A.2)."""

from __future__ import annotations

from typing import Annotated

import numpy as np

from normzoo.data.dataset import Dataset, check_fits_in_memory
from normzoo.errors import NormzooError
from normzoo.spec import Count, NonNegative, PositiveInt, Range, Seed

Features = Annotated[int, Range(1, 4096)]


def gaussian_regression(*, data_dir: str | None = None, features: Features = 10, n_train: PositiveInt = 4096,
                        n_test: Count = 1024, seed: Seed = 0, noise: NonNegative = 0.0) -> Dataset:
    """Inputs ``x ~ N(0, I_features)``, targets ``y = A x + noise * N(0, I)`` with ``A_ij ~ N(0, 1)``.

    ``A`` (``features x features``), the train set and the test set come from separate random streams spawned
    from ``seed`` (so ``n_train`` does not change ``A`` or the test set); ``A`` is kept in ``extra["A"]``.
    Inputs and targets are float32 and not normalised. ``task`` is "regression", ``num_classes`` is the output
    dimension (``features``) and ``input_shape`` is ``(features,)``. ``data_dir`` is ignored.
    """
    import torch

    for name, value, low in (("features", features, 1), ("n_train", n_train, 1), ("n_test", n_test, 0)):
        if value < low:
            raise NormzooError(f"gaussian-regression: {name} must be ≥ {low}, got {value}")
    if noise < 0:
        raise NormzooError(f"gaussian-regression: noise must be ≥ 0, got {noise}")
    check_fits_in_memory("gaussian-regression", ((n_train + n_test) * 2 + features) * features * 16)
    a_rng, train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    matrix = a_rng.standard_normal((features, features))

    def make(count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = rng.standard_normal((count, features))
        y = x @ matrix.T + noise * rng.standard_normal((count, features))
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))

    train_x, train_y = make(n_train, train_rng)
    test_x, test_y = make(n_test, test_rng)
    return Dataset(
        name="gaussian-regression", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        num_classes=features, input_shape=(features,), task="regression",
        source=f"generated (seed {seed})", extra={"A": torch.from_numpy(matrix.astype(np.float32))},
    )
