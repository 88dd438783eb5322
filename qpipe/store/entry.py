"""Cache entries that several processes may ask for at the same moment (two runs started at
once, the jobs of a joblib/submitit sweep sharing a baseline or a checkpoint).

Every cache (stage results, checkpoints, model folders, tokenizers) is written the same way:

- under an exclusive ``flock`` on ``<entry>.lock`` beside the entry, one lock per key: the
  first process computes, the others wait and then find its finished entry. The kernel drops
  the lock when its holder dies, however it dies (SIGKILL, the OOM killer), so nobody waits
  for a dead writer;
- into a partial folder unique to the writer (``<entry>.<pid>-<random>.partial``), which no
  other process ever deletes while its writer lives: leftovers of dead writers are removed by
  the next holder of the lock, who alone may write that key;
- renamed into place only when finished (``rename`` of a folder is atomic), so a reader sees
  either no entry or a whole one. A damaged entry being replaced is first renamed aside, so a
  crash half-way through deleting it never leaves something that looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from qpipe.errors import QpipeError
from qpipe.store.diskspace import guarded_write

log = logging.getLogger("qpipe")


class CacheLockError(QpipeError):
    """A cache entry's lock file cannot be made (a folder in its place, a read-only cache)."""


_HELD: dict[str, int] = {}  # entries this process holds the lock of (re-entrant)


@contextlib.contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold the lock of one cache entry (waiting, with a log line, while another process
    writes it). Re-entrant within a process."""
    key = str(entry)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock = entry.with_name(entry.name + ".lock")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise CacheLockError(
            f"cannot lock the cache entry {entry} ({err.strerror or err}: {err.filename or lock}"
            "); remove what is in the way, or move QPIPE_OUTPUTS"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another qpipe process that is writing %s", entry)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _leftovers(entry: Path) -> list[Path]:
    names = (f"{entry.name}.*.partial", f"{entry.name}.*.stale", f"{entry.name}.partial")
    return [p for pattern in names for p in entry.parent.glob(pattern)]


def new_partial(entry: Path) -> Path:
    """A fresh folder, unique to this writer, to write ``entry`` into. Call it holding the
    entry's lock: partial folders of the same key left by dead writers are removed first."""
    for stale in _leftovers(entry):
        shutil.rmtree(stale, ignore_errors=True)
    partial = entry.with_name(f"{entry.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    partial.mkdir(parents=True)
    return partial


def publish(partial: Path, entry: Path) -> None:
    """Rename the finished ``partial`` into place (holding the entry's lock). An entry already
    there (damaged, or from before) is renamed aside first, then deleted."""
    if entry.exists() or entry.is_symlink():
        aside = entry.with_name(f"{entry.name}.{os.getpid()}-{secrets.token_hex(4)}.stale")
        entry.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    partial.rename(entry)


def save_folder_atomically(
    target: Path,
    write: Callable[[Path], object],
    needed: int,
    marker: str = "config.json",
    what: str = "the weights",
) -> Path:
    """Write a folder under a name unique to this writer and rename it into place, holding
    the folder's lock (``entry_lock``): a half-written folder is never mistaken for a
    finished one (``marker``: the file a finished one has), one stopped by an error, Ctrl-C or
    a full disk is removed, and a process that finds another one writing it waits for it."""
    if (target / marker).is_file():
        return target
    with entry_lock(target):
        if (target / marker).is_file():  # another process finished it while we waited
            return target
        tmp = new_partial(target)
        try:
            with guarded_write(tmp, needed, f"{what} of {target.name}"):
                write(tmp)
            publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
