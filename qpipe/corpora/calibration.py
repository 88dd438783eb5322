"""Calibration data for GPTQ/AWQ: texts from the ``calib`` config group, and token windows.

The default is the built-in mixed-domain set (``qpipe/data/calib/``: technical documentation,
prose, legal text, code comments), which shares no passage with the evaluation texts:
calibrating on what you score on flatters the quantizer, and calibrating on one kind of English
tunes the quantizer to it. ``calib.dataset`` takes the user's own data instead: a local text
file, a folder of text files, a JSONL file with a text field, or a Hugging Face dataset id
(which needs hub access).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qpipe.config.pathcheck import kind_of, path_stat
from qpipe.corpora.texts import read_utf8
from qpipe.errors import ConfigError, WeightsUnavailable
from qpipe.store.paths import data_file

BUILTIN = "calib"  # a folder of qpipe/data: one text per domain
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
_VALID_DATASET = (
    "a text file, a folder of .txt/.md/.rst files, a JSONL file with a text field, "
    "or a Hugging Face dataset id"
)


def _local_path(dataset: str) -> Path | None:
    """``dataset`` as a local path when it is one (or plainly means one); None for a hub id."""
    path, info = path_stat(dataset, "calib.dataset")
    if info is not None:
        found = kind_of(path, "calib.dataset")
        if found not in ("a file", "a folder"):  # /dev/zero would be read forever
            raise ConfigError(f"calib.dataset={dataset!r} is {found}; give {_VALID_DATASET}")
        return path
    looks_local = dataset.startswith(("/", "./", "../", "~")) or dataset.endswith(
        TEXT_SUFFIXES + JSONL_SUFFIXES
    )
    if looks_local:
        raise ConfigError(f"calib.dataset={dataset!r} does not exist; give {_VALID_DATASET}")
    return None


def validate_calib(calib: Mapping[str, Any]) -> None:
    """One-line ConfigError for a bad ``calib`` value (cheap: reads local data once, to check
    it decodes, and never the hub)."""
    for key in ("num_samples", "seq_len"):
        value = calib.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"calib.{key}={value!r} is not valid; use a positive integer")
    dataset = calib.get("dataset")
    if dataset:
        path = _local_path(str(dataset))
        if path is not None and path.is_dir() and not _text_files(path):
            raise ConfigError(
                f"calib.dataset={dataset!r} is a folder with no {'/'.join(TEXT_SUFFIXES)} "
                f"files; give {_VALID_DATASET}"
            )
        if path is not None:
            read_local(path, calib.get("text_column") or "text")
        return
    name = calib.get("text_file") or BUILTIN
    if not data_file(name).exists():
        raise ConfigError(
            f"calib.text_file={name!r} is not a text or folder in qpipe/data; use {BUILTIN} "
            "(the mixed-domain set) or calib_licenses.txt"
        )


def builtin_texts(name: str = BUILTIN) -> list[str]:
    """A built-in calibration text or folder of texts (``qpipe/data``), one string each."""
    return read_local(data_file(name))


def load_calib_texts(calib: Mapping[str, Any]) -> list[str]:
    """The calibration texts named by the ``calib`` config group, one string per document.

    Built-in set or local path: every document whole (windows are spread over all of them).
    Hub dataset: up to ``4 * num_samples`` non-empty rows of ``text_column``.
    """
    validate_calib(calib)
    dataset = calib.get("dataset")
    column = calib.get("text_column") or "text"
    if not dataset:
        return builtin_texts(calib.get("text_file") or BUILTIN)
    path = _local_path(str(dataset))
    if path is not None:
        return read_local(path, column)
    return _hub_texts(str(dataset), calib, column)


def _text_files(folder: Path) -> list[Path]:
    # is_file() follows links: a link loop or a device among them is not a text file
    return sorted(p for p in folder.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())


def read_local(path: Path, column: str = "text") -> list[str]:
    """Texts from a local file or folder: a folder gives each of its text files (sorted, so
    runs are reproducible); a ``.jsonl`` gives the ``column`` field of each line; any other
    file is one UTF-8 text."""
    if path.is_dir():
        texts = [read_utf8(p, "calib.dataset") for p in _text_files(path)]
    elif path.suffix in JSONL_SUFFIXES:
        texts = _jsonl_texts(path, column)
    else:
        texts = [read_utf8(path, "calib.dataset")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"calibration data {str(path)!r} holds no text; give {_VALID_DATASET}")
    return texts


def _jsonl_texts(path: Path, column: str) -> list[str]:
    texts = []
    for number, line in enumerate(read_utf8(path, "calib.dataset").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{number} is not valid JSON (one object a line)") from None
        value = row.get(column) if isinstance(row, dict) else None
        if not isinstance(value, str):
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(
                f"{path}:{number} has no text field calib.text_column={column!r}; found: {keys}"
            )
        texts.append(value)
    return texts


def _hub_texts(dataset: str, calib: Mapping[str, Any], column: str) -> list[str]:
    import datasets

    split = calib.get("split") or "train"
    try:
        ds = datasets.load_dataset(dataset, calib.get("dataset_config"), split=split)
    except (ConnectionError, OSError) as err:
        # datasets reports "no hub access" as ConnectionError; a wrong name as an OSError
        # subclass (DatasetNotFoundError is a FileNotFoundError).
        raise WeightsUnavailable(
            f"cannot load calibration dataset {dataset!r} ({type(err).__name__}); offline "
            f"alternative: calib.dataset=null (the built-in set qpipe/data/{BUILTIN}/) or a "
            "local path"
        ) from None
    if column not in ds.column_names:
        raise ConfigError(
            f"calib.text_column={column!r} is not a column of {dataset!r}; "
            f"valid: {', '.join(ds.column_names)}"
        )
    texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    return texts[: int(calib["num_samples"]) * 4]


def token_windows(ids: Sequence[int], num_samples: int, seq_len: int) -> list[list[int]]:
    """``num_samples`` non-overlapping windows of ``seq_len`` tokens, spread evenly over
    ``ids`` so that every part of the corpus (each domain, each document) is represented.
    Fewer windows when the text is short; a text shorter than one window gives one window."""
    count = len(ids) // seq_len
    if count == 0:
        return [list(ids)] if ids else []
    picks = range(count) if count <= num_samples else _spread(count, num_samples)
    return [list(ids[i * seq_len : (i + 1) * seq_len]) for i in picks]


def _spread(count: int, n: int) -> list[int]:
    return [int(i * count / n) for i in range(n)]


def synthetic_windows(vocab_size: int, num_samples: int, seq_len: int) -> list[list[int]]:
    """Random token ids, for models without a tokenizer (random-weight models, where
    calibration text carries no meaning anyway). Seeded: runs are reproducible."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (num_samples, seq_len), generator=gen).tolist()
