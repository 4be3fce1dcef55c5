"""What the entry points (``python -m cultureclip.train / .evaluate / .curate``, ``tools/*``) show when a
run stops on the user's input or settings: one last line ``error: <Type>: <message>`` (the message names
the file, field or config key and what to do), exit status 1, no traceback. ``CULTURECLIP_TRACEBACK=1``
in the environment shows the traceback instead. Errors outside these types are bugs and keep theirs.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from cultureclip.rundir import RunDirError

TRACEBACK_ENV = "CULTURECLIP_TRACEBACK"


class ConfigError(ValueError):
    """A setting that cannot work here (the message names the key and the fix)."""


# ValueError: bad settings and records (RecordError, StageMismatchError, ...); OSError: files that are
# missing, exist already, or cannot be written (disk full); ImportError: an optional extra not installed.
USER_ERRORS: tuple = (ValueError, OSError, ImportError, RunDirError)  # RunDirError: a locked or used run folder


def one_line(exc: BaseException) -> str:
    """``error: <Type>: <message>`` on one line, with any registered secret scrubbed."""
    from cultureclip.curate.sanitize import scrub  # no heavy imports: stdlib only
    return f"error: {type(exc).__name__}: {' '.join(scrub(exc).split())}"


def report(exc: BaseException) -> int:
    """Print ``exc`` as the one-line error and return exit status 1; under ``CULTURECLIP_TRACEBACK=1``
    re-raise it with its traceback. Call it from an ``except`` block."""
    if os.environ.get(TRACEBACK_ENV):
        raise exc
    print(one_line(exc), file=sys.stderr)
    return 1


@contextlib.contextmanager
def exit_on_user_error(extra: tuple = ()) -> Iterator[None]:
    """Around an entry point's body: a :data:`USER_ERRORS` (or ``extra``) exception ends the process with
    the one-line error and exit status 1."""
    try:
        yield
    except USER_ERRORS + tuple(extra) as exc:
        sys.exit(report(exc))
