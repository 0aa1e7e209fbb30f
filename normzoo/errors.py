"""User-facing errors: the CLI prints these as one line and exits with code 2 (``--debug`` shows the traceback)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NormzooError(Exception):
    """An error caused by the user's input (a bad spec, a missing file, ...), not by a bug."""

    exit_code = 2


class SpecError(NormzooError, ValueError):
    """A norm/backbone/dataset/probe spec that cannot be parsed or resolved."""


class PluginError(NormzooError):
    """A plugin failed to load, raised inside a hook, or broke the registry's rules."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
