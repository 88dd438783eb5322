"""SIGTERM (``kill``, a batch system's time limit) and SIGHUP (a closed terminal, a dropped
ssh) end a run the way Ctrl-C does: the run is marked KILLED with the signal's name, the
partial output of the stage it was in is removed, a sweep's parent run is closed, and the
process exits with the shell's code (128 + the signal's number) instead of vanishing mid-write.

The handler raises ``Interrupted`` (a KeyboardInterrupt, so every cleanup path for Ctrl-C runs
for it too) and remembers the signal: where the exception cannot travel — raised inside a
finalizer, or swallowed by library code that catches everything — Python drops it, but the
runner asks ``pending()`` after every stage and ends the run KILLED all the same, never
FINISHED.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The shell's convention: 128 + the signal number.
EXIT_CODES = {s.name: 128 + int(s) for s in HANDLED}


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when one of ``HANDLED`` arrives."""

    signal_name = "SIGINT"

    def __init__(self, name: str = "SIGINT") -> None:
        super().__init__(name)
        self.signal_name = name


class Terminated(Interrupted):
    """SIGTERM (kept as a name of its own: callers catch it)."""

    def __init__(self, name: str = "SIGTERM") -> None:
        super().__init__(name)


_pending: str | None = None
_previous: dict[int, Any] = {}
_previous_hook: Any = None


def _raise(signum: int, frame: FrameType | None) -> None:
    global _pending
    name = signal.Signals(signum).name
    _pending = _pending or name
    raise Terminated(name) if name == "SIGTERM" else Interrupted(name)


def _unraisable(info: Any) -> None:
    """Our own interrupt raised inside a finalizer: Python would print "Exception ignored" and
    a traceback, then go on; the runner acts on ``pending()`` instead."""
    if isinstance(info.exc_value, Interrupted) and _pending is not None:
        return
    (_previous_hook or sys.__unraisablehook__)(info)


def install() -> None:
    """Handle SIGINT, SIGTERM and SIGHUP as ``Interrupted`` (main thread only: a launcher's
    worker thread cannot take signals)."""
    global _previous_hook
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in HANDLED:
        current = signal.getsignal(sig)
        if current is not _raise:
            _previous[sig] = current
        signal.signal(sig, _raise)
    if sys.unraisablehook is not _unraisable:
        _previous_hook = sys.unraisablehook
        sys.unraisablehook = _unraisable


def restore() -> None:
    """Put back the handlers ``install`` replaced (an embedding program, a test)."""
    global _previous_hook
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in list(_previous.items()):
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _previous.clear()
    if sys.unraisablehook is _unraisable:
        sys.unraisablehook = _previous_hook or sys.__unraisablehook__
    _previous_hook = None


def pending() -> str | None:
    """The name of a signal that arrived and has not been dealt with yet."""
    return _pending


def raise_pending() -> None:
    """Raise the interrupt of a signal whose exception was lost on its way."""
    if _pending is not None:
        raise Terminated(_pending) if _pending == "SIGTERM" else Interrupted(_pending)


def clear() -> None:
    global _pending
    _pending = None


def exit_code(interrupt: BaseException) -> int:
    return EXIT_CODES.get(getattr(interrupt, "signal_name", "SIGINT"), 130)
