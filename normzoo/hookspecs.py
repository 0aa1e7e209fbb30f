"""The plugin author's contract: every hook normzoo calls, with what it receives and what it must do.

A plugin is any module or object with functions marked ``@normzoo.hookimpl`` whose names match these
specs. Installed packages expose plugins through the ``normzoo`` entry-point group::

    [project.entry-points.normzoo]
    my_norms = "my_package.plugin"

normzoo's own norms, backbones and datasets are registered through exactly these hooks
(see ``normzoo/default_plugins/``), so they double as worked examples.

Each ``register`` callback has the signature::

    register(name, factory, *, summary, reference="", positional=None)

``name`` is the spec family users type (``"lp"`` in ``lp:inf``). ``factory`` is a class or function;
its keyword parameters that have defaults become the spec's parameters (``lp:inf,centered=true``), typed by
their annotation (``int``, ``float``, ``bool``, ``str`` or ``Literal[...]``) or default value.
``positional`` names the parameter that may follow the colon (``"p"`` for ``lp:inf``).
A name registered twice (by two plugins, or twice by one) is reported as an error naming both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("normzoo")
hookimpl = pluggy.HookimplMarker("normzoo")

Register = Callable[..., Any]


@hookspec
def register_norms(register: Register) -> None:
    """Register normalization layers.

    Called once, the first time normzoo needs the norm registry. ``factory`` is called as
    ``factory(num_features, *, device=None, dtype=None, **spec_params)`` and must return an ``nn.Module``
    that accepts ``(N, C)`` and ``(N, C, H, W)`` inputs, defines train and eval behaviour and owns its
    ``reset_parameters()``. It should have a ``traits`` attribute (a ``normzoo.NormTraits``) saying whether
    it depends on the batch, keeps running statistics and the fewest values per channel it needs.
    The constructor convention is ``Norm(num_features, *, eps, affine, device=None, dtype=None, **params)``;
    a factory whose signature does not take ``num_features`` first or cannot take ``device``/``dtype`` is refused
    at registration with an error naming the plugin. ``normzoo.testing.norm_contract`` checks the rest.
    """


@hookspec
def register_backbones(register: Register) -> None:
    """Register model builders.

    ``factory`` is called as ``factory(*, norm_layer, num_classes, in_chans, **spec_params)`` where
    ``norm_layer(num_features)`` builds the chosen norm (it returns ``nn.Identity`` for ``none``).
    A builder that cannot place norms itself may ignore ``norm_layer``; normzoo then injects the norm
    by module swap (see ``normzoo.placement``).
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets.

    ``factory`` is called as ``factory(*, data_dir, **spec_params)`` and returns a ``normzoo.data.Dataset``
    (tensors for train and test, the number of classes and the input shape). It must raise
    ``normzoo.NormzooError`` naming where it looked when its files are missing, never fall back silently.
    """


@hookspec
def register_probes(register: Register) -> None:
    """Register probe metrics (measurements taken during training, e.g. loss-landscape smoothness).

    ``factory`` is a probe class called with its spec parameters; the probe contract lives in
    ``normzoo.probe``.
    """


@hookspec
def register_loggers(register: Register) -> None:
    """Register experiment trackers: where a run's records go besides ``metrics.jsonl`` (``--log SPEC``).

    ``factory`` is called with its spec parameters and returns a ``normzoo.loggers.Logger``: ``open(run_dir,
    config, step)`` once the run folder exists (``step`` > 0 when a run resumes), ``log(record)`` for every record
    the runner writes to ``metrics.jsonl`` (after writing it), ``close()`` at the end. The factory should check
    that what it needs is installed and raise ``normzoo.NormzooError`` saying what to install otherwise. A logger
    that raises later is reported once and dropped; the run goes on and ``metrics.jsonl`` stays complete.
    """


KINDS: dict[str, str] = {
    "norms": "register_norms",
    "backbones": "register_backbones",
    "datasets": "register_datasets",
    "probes": "register_probes",
    "loggers": "register_loggers",
}
"""Registry kind -> hook that fills it."""
