"""Built-in texts and token streams for evaluation and memory validation."""

from __future__ import annotations

from pathlib import Path

import torch

from qpipe.config.pathcheck import MiB, kind_of, read_bounded, require_file
from qpipe.errors import ConfigError
from qpipe.store.paths import data_file

TEXT_LIMIT = 256 * MiB  # an eval or calibration text; qpipe uses a few MB of any


def read_utf8(path: Path, what: str, limit: int = TEXT_LIMIT) -> str:
    """A file qpipe reads as text, decoded as UTF-8; one ConfigError line naming the file and
    the setting it came from (``what``) when it is not a regular file (a device such as
    /dev/zero never ends, a named pipe blocks), is larger than ``limit``, is not text, or
    cannot be read."""
    path = require_file(path, what, "give a UTF-8 text file")
    try:
        data = read_bounded(path, limit, what)
    except OSError as err:
        raise ConfigError(f"{what}: cannot read {path} ({err.strerror or err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{what}: {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); give a UTF-8 text file"
        ) from None


def read_text(name_or_path: str, key: str = "eval.text") -> str:
    """A built-in text by file name (``qpipe/data``) or any UTF-8 file by path."""
    path = data_file(name_or_path)
    if not path.is_file():
        path = Path(name_or_path).expanduser()
    found = kind_of(path, key) if path == Path(name_or_path).expanduser() else "a file"
    if found != "a file":
        it = f" ({found})" if found else ""
        raise ConfigError(
            f"{key}={name_or_path!r} is neither a built-in text (eval_gpl3.txt) nor a file{it}"
        )
    return read_utf8(path, f"{key}={name_or_path!r}")


def token_ids(tokenizer, text: str, count: int) -> torch.Tensor:
    """The first ``count`` token ids of ``text`` (repeated if the text is shorter)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise ConfigError("the evaluation text tokenizes to nothing")
    repeats = -(-count // ids.numel())
    return ids.repeat(repeats)[:count]
