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
  crash half-way through deleting it never leaves something that looks finished;
- sealed before the rename: a manifest (``.qpipe-manifest.json``, qpipe.store.integrity)
  records what every file held, and every use checks the entry against it first (once per
  process while its files' stat stays the same). An entry that fails is moved aside whole
  (``<entry>.damaged-<time>``, kept for inspection, named in one warning line) and computed
  again: never reused, never left in the way.

A process that waits for another's lock says for whom (its pid) and gives up, in one line,
when that process is stopped or held it too long (qpipe.store.lockwait).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qpipe.errors import QpipeError
from qpipe.store.diskspace import guarded_write
from qpipe.store.integrity import build_manifest, manifest_problem, stat_key
from qpipe.store.lockwait import acquire

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
        acquire(fd, lock, f"writing {entry}")
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


MANIFEST = ".qpipe-manifest.json"
MANIFEST_VERSION = 1
DAMAGED = ".damaged-"
_VERIFIED: dict[str, tuple] = {}  # entries checked by this process: their files' stat then


def seal(partial: Path, kind: str) -> None:
    """Record what ``partial`` holds (its manifest), once everything is written into it and
    before it is published."""
    files = build_manifest(partial, skip=(MANIFEST,))
    record = {"version": MANIFEST_VERSION, "kind": kind, "files": files}
    (partial / MANIFEST).write_text(json.dumps(record))


def _read_manifest(entry: Path) -> dict[str, Any]:
    data = json.loads((entry / MANIFEST).read_text())
    if data.get("version") != MANIFEST_VERSION or not isinstance(data.get("files"), dict):
        raise ValueError("unknown manifest version")
    return data


def _stats(entry: Path, files: dict[str, Any]) -> tuple:
    try:
        return tuple([*stat_key(entry / MANIFEST)] + [stat_key(entry / rel) for rel in files])
    except OSError:
        return ()


def entry_problem(entry: Path, full: bool = False) -> str | None:
    """Why the finished entry ``entry`` may not be reused (None: it holds what was written).
    Cheap when this process already checked it and nothing changed since; ``full`` hashes
    every byte (``python -m qpipe.cache verify``)."""
    key = str(entry)
    if not (entry / MANIFEST).is_file():
        return f"it has no manifest {MANIFEST} (written by an older qpipe, or not by qpipe)"
    try:
        data = _read_manifest(entry)
    except (OSError, ValueError) as err:
        return f"its manifest is unreadable ({type(err).__name__})"
    files = data["files"]
    if not full and _VERIFIED.get(key) == _stats(entry, files) != ():
        return None
    try:
        problem, renewed = manifest_problem(entry, files, full=full)
    except (OSError, KeyError, TypeError, ValueError) as err:
        return f"its manifest does not describe it ({type(err).__name__}: {err})"
    if problem:
        _VERIFIED.pop(key, None)
        return problem
    if renewed:  # written to or copied, yet whole: the fast check holds for them again
        for rel in renewed:
            files[rel]["stat"] = stat_key(entry / rel)
        with contextlib.suppress(OSError):  # a read-only cache is checked in full each time
            tmp = entry / f"{MANIFEST}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(data))
            os.replace(tmp, entry / MANIFEST)
    _VERIFIED[key] = _stats(entry, files)
    return None


def entry_ok(entry: Path) -> bool:
    """The entry is there and holds what was written (checked as ``entry_problem`` does)."""
    return entry.is_dir() and entry_problem(entry) is None


def _shown(entry: Path) -> str:
    """An entry's path as the user finds it: from the outputs folder on when it lies there."""
    from qpipe.store.paths import outputs_root

    try:
        return str(Path(entry).relative_to(outputs_root()))
    except ValueError:
        return str(entry)


def move_aside(entry: Path, problem: str, what: str) -> Path:
    """Move a damaged entry out of the way, whole, for inspection (one warning line naming
    both places); call it holding the entry's lock."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = entry.with_name(f"{entry.name}{DAMAGED}{stamp}-{secrets.token_hex(2)}")
    entry.rename(aside)
    _VERIFIED.pop(str(entry), None)
    log.warning(
        "cached %s %s is damaged (%s): moved aside to %s; computing it again",
        what,
        _shown(entry),
        problem,
        aside.name,
    )
    return aside


def reusable(entry: Path, what: str) -> bool:
    """True when ``entry`` may be reused; a damaged one is moved aside (``move_aside``) and
    False returned, as for a missing one. Call it holding the entry's lock."""
    if not (entry.exists() or entry.is_symlink()):
        return False
    problem = entry_problem(entry) if entry.is_dir() else "it is not a folder"
    if problem is None:
        return True
    move_aside(entry, problem, what)
    return False


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
    kind: str = "model folder",
) -> Path:
    """Write a folder under a name unique to this writer and rename it into place, holding
    the folder's lock (``entry_lock``): a half-written folder is never mistaken for a
    finished one (``marker``: the file a finished one must have), one stopped by an error,
    Ctrl-C or a full disk is removed, and a process that finds another one writing it waits
    for it. A finished folder is reused only if it still holds what was written (its
    manifest); a damaged one is moved aside and written again."""
    if entry_ok(target) and (target / marker).is_file():
        return target
    with entry_lock(target):
        # Another process may have finished it while we waited, or found it damaged.
        if reusable(target, kind) and (target / marker).is_file():
            return target
        tmp = new_partial(target)
        try:
            with guarded_write(tmp, needed, f"{what} of {target.name}"):
                write(tmp)
                seal(tmp, kind)
            publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
