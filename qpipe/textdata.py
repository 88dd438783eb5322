"""Built-in texts and token streams for evaluation and memory validation."""

from __future__ import annotations

from pathlib import Path

import torch

from qpipe.errors import ConfigError
from qpipe.paths import data_file


def read_text(name_or_path: str) -> str:
    """A built-in text by file name (``qpipe/data``) or any UTF-8 file by path."""
    path = data_file(name_or_path)
    if not path.is_file():
        path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"eval.text={name_or_path!r} is neither a built-in text (eval_gpl3.txt) nor a file"
        )
    return path.read_text(encoding="utf-8")


def token_ids(tokenizer, text: str, count: int) -> torch.Tensor:
    """The first ``count`` token ids of ``text`` (repeated if the text is shorter)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise ConfigError("the evaluation text tokenizes to nothing")
    repeats = -(-count // ids.numel())
    return ids.repeat(repeats)[:count]
