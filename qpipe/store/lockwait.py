"""Waiting for a lock another process holds, without waiting forever.

qpipe's locks are ``flock``s on small files (a cache entry's ``<entry>.lock``, the MLflow
store's ``mlflow.db.lock``, a run folder's claim). The kernel drops one when its holder dies,
however it dies, so a dead holder never blocks anyone. A *stopped* one does: a run suspended
with Ctrl-Z (or SIGSTOP) keeps its lock until it is resumed, and a hung one until it ends. So
the holder writes its pid and host into the lock file, and a waiter:

- says whom it waits for (the pid), once;
- gives up with one line when that process is stopped (``/proc/<pid>/stat`` state T or t);
- gives up with one line after ``QPIPE_LOCK_WAIT_S`` seconds (default 3 hours: writing a
  quantized 8B checkpoint on a slow machine takes long, a lock held for hours does not).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from qpipe.errors import QpipeError

log = logging.getLogger("qpipe")

WAIT_ENV = "QPIPE_LOCK_WAIT_S"
DEFAULT_WAIT_S = 3 * 3600.0


class LockWaitError(QpipeError):
    """The holder of a lock is stopped, or held it past the bound."""


def wait_bound() -> float:
    raw = os.environ.get(WAIT_ENV)
    try:
        return float(raw) if raw else DEFAULT_WAIT_S
    except ValueError:
        return DEFAULT_WAIT_S


def write_holder(fd: int) -> None:
    """Record this process as the holder (call it holding the lock)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


def read_holder(lock: Path) -> tuple[int, str] | None:
    """(pid, host) the lock file names, None when it names nobody."""
    try:
        pid, host = Path(lock).read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def process_state(pid: int) -> str | None:
    """The state letter of a process of this host (R, S, D, T, t, Z...), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]  # the name (field 2) may hold spaces and ')'


def _holder_text(holder: tuple[int, str] | None) -> str:
    if holder is None:
        return "another qpipe process"
    pid, host = holder
    return f"pid {pid}" + ("" if host == socket.gethostname() else f" on host {host}")


def acquire(fd: int, lock: Path, what: str) -> None:
    """Take the exclusive flock on ``fd`` (the open ``lock`` file) for ``what`` (a phrase:
    "writing <entry>"), waiting for its holder as the module says; then record this process as
    the holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _wait(fd, lock, what)
    write_holder(fd)


def _wait(fd: int, lock: Path, what: str) -> None:
    bound = wait_bound()
    start = time.monotonic()
    holder = read_holder(lock)
    log.info("waiting for %s, which is %s", _holder_text(holder), what)
    pause = 0.05
    while True:
        time.sleep(pause)
        pause = min(pause * 2, 1.0)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = read_holder(lock) or holder
        here = holder is not None and holder[1] == socket.gethostname()
        if here and process_state(holder[0]) in ("T", "t"):
            raise LockWaitError(
                f"pid {holder[0]} holds the lock {lock} ({what}) and is stopped (Ctrl-Z "
                f"or SIGSTOP): resume it (fg, or kill -CONT {holder[0]}) or end it, then "
                "run again"
            )
        waited = time.monotonic() - start
        if waited > bound:
            raise LockWaitError(
                f"gave up after {waited:.0f} s waiting for {_holder_text(holder)}, which holds "
                f"the lock {lock} ({what}); if it is hung, end it and run again "
                f"({WAIT_ENV}={bound:g} sets how long to wait)"
            )
