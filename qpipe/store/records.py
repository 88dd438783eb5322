"""Small JSON files under ``outputs/cache`` that several processes read and update: the 4-bit
kernel tuner's choices, the warm-up times a later run compares itself with.

A reader sees a whole file or none: a writer writes a temporary file beside it and renames it
into place (``os.replace`` is atomic). An update (read, merge, write) holds the file's lock
(``entry_lock``: ``flock``, dropped by the kernel when its holder dies), so two processes
adding entries at once both keep theirs. A file that cannot be parsed (truncated by hand, from
an older qpipe) reads as empty and is rewritten whole by the next update.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qpipe.store.entry import entry_lock
from qpipe.store.paths import cache_dir


def read_json(path: Path) -> dict[str, Any]:
    """The file's object, or {} when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` whole or not at all (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def update_json(path: Path, merge: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """Under the file's lock: read it, ``merge`` (gets what is there, returns the new whole),
    write it. Returns what was written."""
    with entry_lock(Path(path)):
        data = merge(read_json(path))
        write_json(path, data)
    return data


def record_path(kind: str, key: str) -> Path:
    """``outputs/cache/<kind>/<key>.json``."""
    return cache_dir(kind) / f"{key}.json"
