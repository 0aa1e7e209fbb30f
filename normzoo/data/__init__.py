"""Datasets as whole tensors: :func:`load_dataset` builds one from a spec through the plugin registry.

``load_dataset("cifar10")``, ``load_dataset("fashion-mnist-mini")``, ``load_dataset("synthetic,n=512,classes=4")``.
The data folder is the ``data_dir`` argument, else ``$NORMZOO_DATA``, else ``~/.cache/normzoo`` (respecting
``XDG_CACHE_HOME``); see :func:`resolve_data_dir`. Augmentation runs on the device in batches (:func:`augment`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from normzoo.data.dataset import DATA_ENV, Dataset, augment, resolve_data_dir, to_device

if TYPE_CHECKING:
    from normzoo.spec import Spec

__all__ = ["DATA_ENV", "Dataset", "augment", "load_dataset", "resolve_data_dir", "to_device"]


def load_dataset(spec: str | Spec, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Build the dataset named by ``spec`` (e.g. ``"cifar10"``, ``"synthetic,n=512"``) from any plugin.

    Unknown names and parameters raise :class:`normzoo.SpecError` with the valid choices; missing files raise
    :class:`normzoo.NormzooError` naming where they were looked for. The returned dataset's ``spec`` is the
    canonical spec string (every parameter spelled out), for configs and checkpoints.
    """
    from normzoo.errors import PluginError
    from normzoo.plugins import registry

    datasets = registry("datasets")
    parsed = datasets.parse(spec)
    dataset = datasets.build(parsed, data_dir=str(resolve_data_dir(data_dir)))
    if not isinstance(dataset, Dataset):
        raise PluginError(f"dataset '{parsed.family}' returned {type(dataset).__name__}, "
                          "not a normzoo.data.Dataset")
    try:
        dataset.validate()
    except ValueError as exc:
        raise PluginError(f"dataset '{parsed.family}' broke the Dataset contract: {exc}") from None
    dataset.spec = parsed.canonical()
    return dataset
