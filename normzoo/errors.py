"""User-facing errors: the CLI prints these as one line and exits with code 2 (``--debug`` shows the traceback)."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class NormzooError(Exception):
    """An error caused by the user's input (a bad spec, a missing file, ...), not by a bug."""

    exit_code = 2


class SpecError(NormzooError, ValueError):
    """A norm/backbone/dataset/probe spec that cannot be parsed or resolved."""


class PluginError(NormzooError):
    """A plugin failed to load, raised inside a hook or its code, or broke the registry's or a contract's rules.

    Exit code 1: the input was fine, the plugin's code was not.
    """

    exit_code = 1


class RunFailed(NormzooError):
    """The run could not go on for a reason outside the user's input (out of memory, a full or read-only disk)."""

    exit_code = 1


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: ``MemoryError``, torch's ``OutOfMemoryError`` (CUDA), or the
    ``RuntimeError`` torch's CPU allocator raises ("can't allocate memory")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))


# A full disk is the machine's state, not the user's input; a read-only or missing folder is the input.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


def describe_os_error(exc: OSError) -> tuple[str, int]:
    """One line naming the path and what the system said, and the exit code (1 for a full disk, else 2)."""
    reason = exc.strerror or " ".join(str(exc).split())
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (the disk is full; earlier checkpoints are intact, --resume continues once there is room)"
    text = f"{exc.filename}: {reason}" if exc.filename else reason
    return text, 1 if exc.errno in _ENVIRONMENT_ERRNOS else 2


def describe_error(exc: BaseException) -> tuple[str, int]:
    """One line and an exit code for any exception that reached the command line."""
    if isinstance(exc, NormzooError):
        return " ".join(str(exc).split()), exc.exit_code
    if is_out_of_memory(exc):
        detail = " ".join(str(exc).split())[:200]
        return (f"out of memory ({type(exc).__name__}: {detail}); try a smaller --batch-size, a narrower backbone "
                "or another device"), 1
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    detail = " ".join(str(exc).split())[:300]
    return f"internal error: {type(exc).__name__}: {detail} (run with --debug for the traceback)", 1
