"""Progress on the terminal: no stage stays silent for more than ~10 s.

``steps`` is for loops that know their length (perplexity windows, decode timings): a line at
most every few seconds, none for a loop that finishes sooner. ``heartbeat`` watches the
terminal while a run goes on and, when nothing has been printed for ``quiet_s`` seconds
(a long forward pass, a library call with no progress of its own), says which stage is still
running and for how long. It is for a person watching: where stdout is not a terminal it stays
quiet, so a log file gets one line per finished step and no ticking.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("qpipe")


def steps(label: str, total: int, every_s: float = 5.0) -> Callable[[int], None]:
    """A callback for step ``done`` of ``total``: logs ``label: done/total (N s)`` when
    ``every_s`` seconds passed since the last line (and the last step, if any line was)."""
    start = last = time.monotonic()
    said = False

    def report(done: int) -> None:
        nonlocal last, said
        now = time.monotonic()
        if now - last >= every_s or (said and done >= total):
            log.info("%s: %d/%d (%.0f s)", label, done, total, now - start)
            last, said = now, True

    return report


class _Activity(logging.Filter):
    """On a console handler, after the filters that decide what it shows: the time of the
    last record it printed."""

    def __init__(self) -> None:
        super().__init__()
        self.last = time.monotonic()

    def filter(self, record: logging.LogRecord) -> bool:
        self.last = time.monotonic()
        return True


@contextmanager
def heartbeat(
    stage: Callable[[], str | None],
    quiet_s: float = 10.0,
    hints: dict[str, str] | None = None,
    enabled: bool | None = None,
) -> Iterator[None]:
    """While the block runs, log ``… <stage>: still running (N s)`` whenever the console has
    been quiet for ``quiet_s``; ``hints[stage]`` is added the first time for that stage.
    ``enabled`` defaults to whether stdout is a terminal."""
    if enabled is None:
        enabled = sys.stdout.isatty()
    consoles = [h for h in logging.getLogger().handlers if not isinstance(h, logging.FileHandler)]
    if not enabled or not consoles:
        yield
        return
    activity = _Activity()
    for handler in consoles:
        handler.addFilter(activity)
    refresh = _watch_bars(activity)
    hints = dict(hints or {})
    done = threading.Event()

    def beat() -> None:
        current, since = None, time.monotonic()
        while not done.wait(min(1.0, quiet_s / 4)):
            name, now = stage(), time.monotonic()
            if name != current:
                current, since = name, now
            if name is None or now - activity.last < quiet_s:
                continue
            hint = hints.pop(name, None)
            suffix = f"; {hint}" if hint else ""
            log.info("… %s: still running (%.0f s)%s", name, now - since, suffix)

    thread = threading.Thread(target=beat, name="qpipe-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
        for handler in consoles:
            handler.removeFilter(activity)
        if refresh is not None:
            refresh()


def _watch_bars(activity: _Activity) -> Callable[[], None] | None:
    """A tqdm bar redrawing on the terminal is not silence. Returns the undo."""
    try:
        import tqdm.std as std
    except ImportError:  # pragma: no cover
        return None
    original = std.tqdm.refresh

    def refresh(self, *args, **kwargs):  # noqa: ANN001, ANN202
        activity.last = time.monotonic()
        return original(self, *args, **kwargs)

    std.tqdm.refresh = refresh

    def undo() -> None:
        std.tqdm.refresh = original

    return undo
