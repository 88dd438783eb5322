"""Path settings checked for what they must be before anything uses them: a folder, a
regular file, readable — never a device (``/dev/zero`` reads forever), a named pipe (opening
one blocks until someone writes), a socket, or a symbolic link loop (``Path.resolve`` raises
``RuntimeError`` on one). Each refusal is one ConfigError line naming the setting, the value
and what it must be.

And texts read with a size bound: a setting that names a 40 GB file by mistake is refused in
one line instead of filling the memory.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from qpipe.errors import ConfigError

MiB = 2**20


def _named(key: str, value: str) -> str:
    """``model.path='/x'`` for a setting; ``pipeline='p.yaml': /x`` when ``key`` already
    names the setting and its value (the file found for it)."""
    return f"{key}={value!r}" if "=" not in key and " " not in key else f"{key}: {value}"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def path_stat(value: object, key: str) -> tuple[Path, os.stat_result | None]:
    """``value`` as a path and its stat (None when nothing is there); ConfigError for a link
    loop, a name too long, or a path that cannot be looked at."""
    value = str(value)
    path = Path(value).expanduser()
    try:
        return path, path.stat()
    except FileNotFoundError:
        return path, None
    except NotADirectoryError:  # a file stands where a folder of the path must be
        return path, None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"{_named(key, value)} is a symbolic link loop") from None
        raise ConfigError(f"{_named(key, value)} cannot be looked at ({err.strerror})") from None


def kind_of(value: object, key: str) -> str | None:
    """ "a folder", "a file", "a device", ... or None when nothing is there."""
    _, info = path_stat(value, key)
    return None if info is None else _kind(info.st_mode)


def require_folder(value: object, key: str, hint: str = "give a folder") -> Path:
    """An existing, readable folder."""
    value = str(value)
    path, info = path_stat(value, key)
    if info is None:
        raise ConfigError(f"{_named(key, value)} does not exist; {hint}")
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{_named(key, value)} is {_kind(info.st_mode)}, not a folder; {hint}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{_named(key, value)} is a folder qpipe may not read; {hint}")
    return path


def require_file(value: object, key: str, hint: str = "give a file") -> Path:
    """An existing, readable regular file."""
    value = str(value)
    path, info = path_stat(value, key)
    if info is None:
        raise ConfigError(f"{_named(key, value)} does not exist; {hint}")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{_named(key, value)} is {_kind(info.st_mode)}, not a file; {hint}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{_named(key, value)} is a file qpipe may not read; {hint}")
    return path


def require_new_or_folder(value: object, key: str, hint: str = "give a folder") -> Path:
    """A folder qpipe may create or write in: nothing there yet, or a folder; no file, device
    or loop at it or at any folder above it."""
    value = str(value)
    path, info = path_stat(value, key)
    if info is not None:
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(
                f"{_named(key, value)} is {_kind(info.st_mode)}, not a folder; {hint}"
            )
        return path
    for parent in path.absolute().parents:
        _, above = path_stat(parent, key)
        if above is None:
            continue
        if not stat.S_ISDIR(above.st_mode):
            raise ConfigError(
                f"{_named(key, value)} lies under {parent}, which is {_kind(above.st_mode)}; {hint}"
            )
        break
    return path


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, or one ConfigError line when it holds more
    than ``limit`` bytes (checked as it is read: a file that grows, /proc files that say 0)."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(
            f"{what}: {path} holds more than {limit / MiB:.0f} MiB; qpipe reads at most that "
            "much from it"
        )
    return data
