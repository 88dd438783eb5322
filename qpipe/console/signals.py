"""SIGTERM ends a run the way Ctrl-C does: the run is marked KILLED and the partial output of
the stage it was in is removed, instead of the process vanishing mid-write."""

from __future__ import annotations

import signal
from types import FrameType

# The shell's convention: 128 + the signal number.
EXIT_CODES = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives."""

    signal_name = "SIGTERM"


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def install() -> None:
    """Turn SIGTERM into ``Terminated`` (a KeyboardInterrupt, so every cleanup path for Ctrl-C
    runs for it too)."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return EXIT_CODES[getattr(interrupt, "signal_name", "SIGINT")]
