"""normzoo: a zoo of normalization layers, backbones and probes for studying why normalization helps training.

The public API is imported lazily so that ``normzoo --help`` starts without importing torch.
"""

from __future__ import annotations

from typing import Any

from normzoo.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "NormzooError": "normzoo.errors",
    "SpecError": "normzoo.errors",
    "Spec": "normzoo.spec",
    "NormTraits": "normzoo.norms.base",
    "NormLayer": "normzoo.norms.base",
    "create_norm": "normzoo.norms.base",
    "parse_norm": "normzoo.norms.base",
    "build_model": "normzoo.models",
    "inject": "normzoo.placement",
    "get_plugins": "normzoo.plugins",
    "registry": "normzoo.plugins",
    "load_checkpoint": "normzoo.checkpoint",
    "save_checkpoint": "normzoo.checkpoint",
    "load_dataset": "normzoo.data",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'normzoo' has no attribute {name!r}")
