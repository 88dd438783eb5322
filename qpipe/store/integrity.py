"""Content manifests for cached folders: what a finished entry held, recorded when it was
written, so that a file changed, truncated, emptied or deleted afterwards is found before it is
reused.

A manifest records, for every file, its size, the sha256 of each 64 MiB chunk (hashed on
several threads: an 8B model's 17 GB folder is a few hundred chunks), a digest of sampled
blocks (the first MiB, where a safetensors header lives, the last block and 16 blocks spread
between), and the file's ``stat`` (mtime, ctime, inode) as it was when the hash was taken.

Checking an entry costs what it must:

- a file whose size differs is damaged at once (truncated, emptied), nothing read;
- a file whose mtime/ctime/inode differ from the record was written to, or copied, since:
  its every chunk is hashed again (a bit flipped by a program, a bad copy);
- a file whose stat is unchanged gets its sampled blocks hashed (~1 MiB a file): bit rot in
  place changes no stat. Only ``python -m qpipe.cache verify`` hashes those whole.

sha256 runs at ~0.9 GB/s a core here (2 shared cores; bench/results/cache_verify.md): hashing
17 GB whole would add ~19 s to every process that opens the entry, the sampled check a few
milliseconds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CHUNK = 64 * 2**20  # bytes per recorded digest
_READ = 8 * 2**20
HEAD = 2**20  # the first MiB: a safetensors header (tensor names, shapes, offsets)
BLOCK = 64 * 2**10
SAMPLES = 16
ALWAYS_FULL = 4 * 2**20  # files this small are hashed whole every time: it costs nothing


def _digest_range(path: Path, start: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(_READ, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (read in chunks: checkpoints are gigabytes)."""
    return _digest_range(path, 0, Path(path).stat().st_size)


def _sample_offsets(size: int) -> list[tuple[int, int]]:
    """Where the sampled blocks of a file of ``size`` bytes lie: the head, the tail, and
    ``SAMPLES`` blocks evenly spread between (the same places at write and at check)."""
    if size <= HEAD + BLOCK:
        return [(0, size)]
    spots = [(0, HEAD), (size - BLOCK, BLOCK)]
    span = size - HEAD - BLOCK
    for i in range(SAMPLES):
        spots.append((HEAD + span * i // SAMPLES, min(BLOCK, span)))
    return spots


def sample_digest(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for start, length in _sample_offsets(size):
            f.seek(start)
            digest.update(f.read(length))
    return digest.hexdigest()


def stat_key(path: Path) -> list[int]:
    """What changes when a file is written to or replaced: mtime, ctime (which no user can
    set back) and inode."""
    info = os.stat(path)
    return [info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _chunk_jobs(paths: Iterable[tuple[str, Path, int]]) -> list[tuple[str, int, Path, int]]:
    jobs = []
    for rel, path, size in paths:
        for index, start in enumerate(range(0, max(size, 1), CHUNK)):
            jobs.append((rel, index, path, start))
    return jobs


def _chunk_digests(paths: list[tuple[str, Path, int]]) -> dict[str, list[str]]:
    """Every chunk of every file hashed, several at once (hashlib and reads release the
    GIL)."""
    jobs = _chunk_jobs(paths)
    sizes = {rel: size for rel, _, size in paths}
    out: dict[str, list[str]] = {rel: [] for rel, _, _ in paths}

    def one(job: tuple[str, int, Path, int]) -> str:
        rel, _, path, start = job
        return _digest_range(path, start, min(CHUNK, sizes[rel] - start))

    with ThreadPoolExecutor(_workers()) as pool:
        for job, digest in zip(jobs, pool.map(one, jobs), strict=True):
            out[job[0]].append(digest)
    return out


def build_manifest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "chunks", "sample", "stat"}} for every file under
    ``folder`` (its files as they are now: call it once they are written)."""
    folder = Path(folder)
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if rel not in skip:
            files.append((rel, path, path.stat().st_size))
    chunks = _chunk_digests(files)
    return {
        rel: {
            "bytes": size,
            "chunks": chunks[rel],
            "sample": sample_digest(path, size),
            "stat": stat_key(path),
        }
        for rel, path, size in files
    }


def _size(n: int) -> str:
    return f"{n:,} bytes"


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def manifest_problem(
    folder: Path, manifest: dict[str, dict[str, Any]], full: bool = False
) -> tuple[str | None, set[str]]:
    """Why ``folder`` no longer holds what ``manifest`` recorded (None when it does), and the
    files whose stat changed but whose bytes were found whole (their record can be renewed).
    ``full`` hashes every chunk of every file."""
    folder = Path(folder)
    rehash: list[tuple[str, Path, int]] = []
    for rel, entry in manifest.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing", set()
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{rel} has {_size(size)}, {_size(entry['bytes'])} were written", set()
        if full or size <= ALWAYS_FULL or stat_key(path) != entry["stat"]:
            rehash.append((rel, path, size))
        elif sample_digest(path, size) != entry["sample"]:
            return f"{rel} changed since it was written (sampled blocks differ)", set()
    digests = _chunk_digests(rehash)
    renewed = set()
    for rel, path, _ in rehash:
        recorded = manifest[rel]["chunks"]
        for index, (now, then) in enumerate(zip(digests[rel], recorded, strict=True)):
            if now != then:
                where = "its sha256"
                if len(recorded) > 1:
                    end = min((index + 1) * CHUNK, manifest[rel]["bytes"])
                    where = f"the sha256 of its bytes {_mib(index * CHUNK)}–{_mib(end)}"
                return f"{rel} changed since it was written: {where} differs", set()
        if stat_key(path) != manifest[rel]["stat"]:
            renewed.add(rel)
    return None, renewed
