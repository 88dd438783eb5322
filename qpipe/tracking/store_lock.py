"""Parallel jobs (a joblib or submitit sweep) share one sqlite MLflow store. Writes are short
transactions that sqlite serialises by itself; what is not safe is two processes *creating*
the store (schema migrations) or the experiment at the same moment. Both happen under an
exclusive lock on a file beside the database."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from qpipe.errors import QpipeError
from qpipe.store.lockwait import acquire
from qpipe.store.paths import unwritable_reason


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for servers and other stores)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return Path(tracking_uri[len(prefix) :])


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock for the store of ``tracking_uri`` (nothing for servers)."""
    path = sqlite_path(tracking_uri)
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        why = unwritable_reason(err, path.parent, f"{path}.lock")
        raise QpipeError(
            f"cannot lock the MLflow store {path} ({why}); fix mlflow.tracking_uri or remove "
            "what is in the way"
        ) from None
    try:
        acquire(fd, Path(f"{path}.lock"), f"creating the MLflow store {path} or its experiment")
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
