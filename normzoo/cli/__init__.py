"""The ``normzoo`` command line: the group (:mod:`normzoo.cli.app`) and its commands, one module per area.

Heavy imports (torch, timm) happen inside commands, so ``normzoo --help`` and the listings start in a moment.
"""

from normzoo.cli import listings, sweeping, training  # noqa: F401  (each registers its commands on the group)
from normzoo.cli.app import cli, format_table, main

__all__ = ["cli", "format_table", "main"]
