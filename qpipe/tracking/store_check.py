"""A local MLflow store (sqlite) that cannot take a run says so the way an unreachable
tracking server does: in one line naming the store and what to do, before any weight is
touched — not with MLflow's five tracebacks from deep inside its ORM.

What is checked, in milliseconds, before the run opens:

- the file is a file (not a folder, a device or a link loop) and a sqlite database (a
  corrupt header is "file is not a database");
- a write can be made: a transaction that rewrites one header field with its own value and is
  rolled back, so a read-only file (another user's, a read-only mount, an immutable file) and a
  lock held by another process (past ``busy_s`` seconds; the holder's pid when this host has it)
  are found;
- the store can grow: free space on its disk and the process's file size limit (``ulimit -f``).

A store that fails after the run opened (the disk fills mid-run) is the offline journal's
case (qpipe.tracking.journal): the run goes on, keeps its results in its folder and says so.
``store_problem`` words MLflow's own sqlite errors for both.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import resource
import shutil
import sqlite3
import stat
import struct
from pathlib import Path

from qpipe.errors import QpipeError

MIN_FREE = 16 * 2**20  # a run adds ~100 kB to the store; its artifacts go beside it
BUSY_ENV = "QPIPE_STORE_BUSY_S"
DEFAULT_BUSY_S = 10.0
# sqlite's lock bytes (os_unix.c): PENDING_BYTE, then RESERVED, then the 510 shared bytes.
_PENDING_BYTE = 0x40000000


class StoreUnusable(QpipeError):
    """The local MLflow store cannot take this run."""


def _busy_s() -> float:
    try:
        return float(os.environ.get(BUSY_ENV) or DEFAULT_BUSY_S)
    except ValueError:
        return DEFAULT_BUSY_S


def _elsewhere(path: Path) -> str:
    return (
        "or log elsewhere (mlflow.tracking_uri=sqlite:///other.db, a server, or another "
        "QPIPE_OUTPUTS)"
    )


def lock_holder(path: Path) -> int | None:
    """The pid of a process of this host holding a write lock on the sqlite file ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _PENDING_BYTE, 512, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        kind, _, _, _, pid = struct.unpack("hhqqi4x", answer)
        return pid if kind != fcntl.F_UNLCK and pid > 0 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _mode(path: Path) -> str:
    info = path.stat()
    return f"owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}"


def check_sqlite_store(path: Path) -> None:
    """StoreUnusable (one line) when the sqlite store at ``path`` cannot take a run."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        info = None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StoreUnusable(
                f"the MLflow store {path} is a symbolic link loop; point mlflow.tracking_uri "
                "at a file"
            ) from None
        raise StoreUnusable(f"the MLflow store {path} cannot be read ({err.strerror})") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        what = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise StoreUnusable(
            f"the MLflow store {path} is {what}; point mlflow.tracking_uri at a sqlite file"
        )
    folder = path.parent
    if info is not None:
        _probe_write(path)
    _check_room(path, folder, info.st_size if info is not None else 0)


def _probe_write(path: Path) -> None:
    busy = _busy_s()
    try:  # the file exists: a plain open never creates one here
        con = sqlite3.connect(str(path), timeout=busy)
    except sqlite3.Error as err:
        raise StoreUnusable(sqlite_problem(path, err, busy)) from None
    try:
        con.isolation_level = None
        version = con.execute("PRAGMA user_version").fetchone()[0]
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute(f"PRAGMA user_version = {int(version)}")
        finally:
            con.execute("ROLLBACK")
    except sqlite3.Error as err:
        raise StoreUnusable(sqlite_problem(path, err, busy)) from None
    finally:
        con.close()


def sqlite_problem(path: Path, err: BaseException, busy: float | None = None) -> str:
    """One line for a sqlite error of the store at ``path``: what is wrong, what to do."""
    text = str(err)
    name = getattr(err, "sqlite_errorname", "") or ""
    if "readonly" in text or name.startswith("SQLITE_READONLY"):
        try:
            how = _mode(path)
        except OSError:
            how = "or its folder"
        return (
            f"the MLflow store {path} is read-only (another user's file, a read-only mount or "
            f"an immutable file; {how}): make it writable, {_elsewhere(path)}"
        )
    if "locked" in text or name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        pid = lock_holder(path)
        who = f"pid {pid}" if pid else "another process"
        waited = f" for {busy:g} s" if busy else ""
        return (
            f"the MLflow store {path} is locked by {who} (waited{waited}): end or wait for "
            f"it ({BUSY_ENV} sets the wait), {_elsewhere(path)}"
        )
    if (
        "not a database" in text
        or "malformed" in text
        or name
        in (
            "SQLITE_NOTADB",
            "SQLITE_CORRUPT",
        )
    ):
        return (
            f"the MLflow store {path} is damaged ({text}): move it aside (mv {path} "
            f"{path}.broken) and restore a backup or let qpipe make a new one, "
            f"{_elsewhere(path)}"
        )
    if "disk is full" in text or "disk I/O" in text or name in ("SQLITE_FULL", "SQLITE_IOERR"):
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        return (
            f"the MLflow store {path} cannot be written ({text}; {free / 1e6:.0f} MB free on "
            f"its disk): free some space, {_elsewhere(path)}"
        )
    return f"the MLflow store {path} fails: {type(err).__name__}: {text}; {_elsewhere(path)}"


def _check_room(path: Path, folder: Path, size: int) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE:
        raise StoreUnusable(
            f"the MLflow store {path} has no room: {free / 1e6:.1f} MB free on its disk, a run "
            f"needs {MIN_FREE / 1e6:.0f} MB; free some space, {_elsewhere(path)}"
        )
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < size + MIN_FREE:
        raise StoreUnusable(
            f"the MLflow store {path} cannot grow: it holds {size / 1e6:.1f} MB and the file "
            f"size limit (ulimit -f) is {soft / 1e6:.1f} MB; raise the limit, "
            f"{_elsewhere(path)}"
        )


def store_problem(uri: str, err: BaseException) -> str | None:
    """One line for an error MLflow raised about a sqlite store (None for other stores or
    errors that are not the store's)."""
    from qpipe.tracking.store_lock import sqlite_path

    path = sqlite_path(uri)
    if path is None:
        return None
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        if isinstance(err, sqlite3.Error):
            return sqlite_problem(path, err)
        orig = getattr(err, "orig", None)  # SQLAlchemy keeps the driver's error there
        if isinstance(orig, sqlite3.Error):
            return sqlite_problem(path, orig)
        err = err.__cause__ or err.__context__
    match = re.search(r"\(sqlite3\.\w+\) ([^\n\[(]+)", " ".join(str(e) for e in seen))
    return sqlite_problem(path, sqlite3.OperationalError(match[1].strip())) if match else None
