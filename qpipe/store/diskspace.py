"""Writing big folders (checkpoints, materialised models, cache entries) when the disk may be
full: check the room before writing, and turn a failed write into one line naming the path and
the bytes it needed, with the partial folder removed."""

from __future__ import annotations

import contextlib
import errno
import re
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

from qpipe.errors import DiskFull

# ENOSPC: device full; EFBIG: file size limit (RLIMIT_FSIZE) or filesystem maximum;
# EDQUOT: quota.
DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# safetensors (Rust) reports write errors as text: "... File too large (os error 27)"
_RUST_OS_CODE = re.compile(r"(?:Os \{ code: |os error )(\d+)")


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def file_size_limit() -> int | None:
    """The process's largest writable file (RLIMIT_FSIZE), None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def disk_errno(err: BaseException) -> int | None:
    """The disk-full errno behind ``err`` (OSError, or a library error wrapping one)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err.errno
        match = _RUST_OS_CODE.search(str(err)) if not isinstance(err, OSError) else None
        if match and int(match.group(1)) in DISK_ERRNOS:
            return int(match.group(1))
        err = err.__cause__ or err.__context__
    return None


def ensure_space(folder: Path, needed: int, what: str) -> None:
    """Raise DiskFull before writing when ``needed`` bytes cannot fit under ``folder``."""
    free = free_bytes(folder)
    if needed > free:
        raise DiskFull(
            f"not enough disk space for {what} at {folder}: needs {gb(needed)}, "
            f"{gb(free)} free; free some space or move QPIPE_OUTPUTS"
        )


@contextlib.contextmanager
def guarded_write(folder: Path, needed: int, what: str) -> Iterator[None]:
    """Check the room for ``needed`` bytes, run the write, and when the disk fills anyway
    (another process, a quota, a file size limit) remove ``folder`` and raise one line naming
    the file that failed and the bytes the whole write needed."""
    ensure_space(folder, needed, what)
    try:
        yield
    except Exception as err:
        code = disk_errno(err)
        if code is None:
            raise
        # OSError names its file; a library's error (safetensors) does not: then the folder.
        failed = getattr(err, "filename", None) or folder
        written = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        limit = file_size_limit()
        why = {errno.EFBIG: "file too large", errno.EDQUOT: "quota exceeded"}.get(
            code, "no space left on device"
        )
        extra = f", file size limit {gb(limit)}" if limit is not None else ""
        done = f", {gb(written)} were written before it failed" if written >= 1e6 else ""
        raise DiskFull(
            f"disk full writing {failed} ({why}): {what} needs {gb(needed)}{done}, "
            f"{gb(free_bytes(folder))} free{extra}; the partial output was removed"
        ) from None
