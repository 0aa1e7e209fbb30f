"""The built-in datasets, as ``(name, factory, summary)`` for ``normzoo.default_plugins.datasets``.

Importing this module imports numpy but not torch or torchvision; factories import those when called.
"""

from __future__ import annotations

from normzoo.data.cifar import cifar10, cifar100
from normzoo.data.idx import fashion_mnist, mnist
from normzoo.data.mini import fashion_mnist_mini
from normzoo.data.regression import gaussian_regression
from normzoo.data.synthetic import synthetic

DATASETS = [
    ("cifar10", cifar10,
     "CIFAR-10, 50k/10k 32x32 RGB, 10 classes (official binary or torchvision folder; downloads if missing)."),
    ("cifar100", cifar100,
     "CIFAR-100, 50k/10k 32x32 RGB, 100 fine or 20 coarse classes (binary or torchvision folder; downloads)."),
    ("mnist", mnist, "MNIST digits from idx files, 60k/10k, 1 channel padded to 32x32 (downloads if missing)."),
    ("fashion-mnist", fashion_mnist,
     "Fashion-MNIST from idx files (data dir, Debian package, or download), 60k/10k, padded to 32x32."),
    ("fashion-mnist-mini", fashion_mnist_mini,
     "Bundled real Fashion-MNIST subset, 10k/2k class-balanced, padded to 32x32; works offline."),
    ("gaussian-regression", gaussian_regression,
     "y = A x with Gaussian x and A (the deep linear network's task), squared-loss regression."),
    ("synthetic", synthetic, "Random learnable images (class pattern + noise) for tests and smoke runs."),
]
