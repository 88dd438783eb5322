"""A folder one live run (or sweep) owns: two processes never write their records into one
folder at the same time.

A run claims its folder (``<run dir>/.qpipe.lock``), a sweep its sweep folder
(``<sweep dir>/.qpipe-sweep.lock``), with an ``flock`` held as long as the process runs there
and its pid written in the file. A second process that finds the claim held is refused in one
line naming the holder; the kernel drops the claim of a process however it ends, so a killed
run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from qpipe.errors import QpipeError
from qpipe.store.lockwait import process_state, read_holder, write_holder

RUN_CLAIM = ".qpipe.lock"
SWEEP_CLAIM = ".qpipe-sweep.lock"


class FolderInUse(QpipeError):
    """Another live qpipe process writes into this folder."""


def _holder_text(lock: Path) -> str:
    holder = read_holder(lock)
    if holder is None:
        return "another qpipe process"
    pid, host = holder
    state = " (stopped)" if process_state(pid) in ("T", "t") else ""
    return f"pid {pid}{state} on {host}"


def live_holder(folder: Path, name: str = RUN_CLAIM) -> str | None:
    """Who holds the claim on ``folder`` now (None when nobody does); claims nothing."""
    lock = Path(folder) / name
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder_text(lock)
    finally:
        os.close(fd)


def take(folder: Path, name: str, refusal: str) -> int:
    """Claim ``folder`` (made if missing); the open claim file, to ``release`` at the end.
    FolderInUse with ``refusal`` (a format string with ``{holder}``) when a live process has it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / name
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(refusal.format(holder=_holder_text(lock))) from None
    write_holder(fd)
    return fd


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def claimed(folder: Path, name: str, refusal: str) -> Iterator[None]:
    fd = take(folder, name, refusal)
    try:
        yield
    finally:
        release(fd)
