"""Content manifests for cached folders: what a finished result held, so that a file changed,
truncated or deleted afterwards is found before it is reused."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 8 * 2**20


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (read in chunks: checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, object]]:
    """{relative path: {"bytes", "sha256"}} for every file under ``folder``."""
    manifest: dict[str, dict[str, object]] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in skip:
            continue
        manifest[rel] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    return manifest


def manifest_problem(folder: Path, manifest: dict[str, dict[str, object]]) -> str | None:
    """Why ``folder`` no longer holds what ``manifest`` recorded (None when it does). Sizes are
    compared first: a truncated or deleted file is found without reading anything."""
    folder = Path(folder)
    for rel, entry in manifest.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{rel} has {size} bytes, {entry['bytes']} were written"
    for rel, entry in manifest.items():
        if file_digest(folder / rel) != entry["sha256"]:
            return f"{rel} changed since it was written (sha256 differs)"
    return None
