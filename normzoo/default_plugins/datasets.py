"""Built-in datasets, registered through the public ``register_datasets`` hook."""

from __future__ import annotations

from normzoo.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    from normzoo.data import builtin

    for name, factory, summary in builtin.DATASETS:
        register(name, factory, summary=summary)
