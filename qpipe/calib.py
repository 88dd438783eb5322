"""Calibration data for GPTQ/AWQ: texts from the ``calib`` config group, and token windows.

The default is the built-in license text (``qpipe/data/calib_licenses.txt``), which is never
the evaluation text: calibrating on what you score on flatters the quantizer. ``calib.dataset``
may name a Hugging Face dataset instead; that needs hub access.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from qpipe.errors import ConfigError, WeightsUnavailable
from qpipe.paths import data_file

BUILTIN = "calib_licenses.txt"


def validate_calib(calib: Mapping[str, Any]) -> None:
    """One-line ConfigError for a bad ``calib`` value (cheap: reads nothing)."""
    for key in ("num_samples", "seq_len"):
        value = calib.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"calib.{key}={value!r} is not valid; use a positive integer")
    if calib.get("dataset") is None and not data_file(calib.get("text_file") or BUILTIN).is_file():
        raise ConfigError(
            f"calib.text_file={calib.get('text_file')!r} is not a file in qpipe/data; use {BUILTIN}"
        )


def load_calib_texts(calib: Mapping[str, Any]) -> list[str]:
    """The calibration texts named by the ``calib`` config group.

    Built-in text: one document. Hub dataset: up to ``num_samples`` non-empty rows of
    ``text_column`` (each becomes at least part of one calibration window).
    """
    validate_calib(calib)
    dataset = calib.get("dataset")
    if not dataset:
        return [data_file(calib.get("text_file") or BUILTIN).read_text(encoding="utf-8")]
    import datasets

    split = calib.get("split") or "train"
    try:
        ds = datasets.load_dataset(dataset, calib.get("dataset_config"), split=split)
    except (ConnectionError, OSError) as err:
        # datasets reports "no hub access" as ConnectionError; a wrong name as an OSError
        # subclass (DatasetNotFoundError is a FileNotFoundError).
        raise WeightsUnavailable(
            f"cannot load calibration dataset {dataset!r} ({type(err).__name__}); offline "
            f"alternative: calib.dataset=null (the built-in text qpipe/data/{BUILTIN})"
        ) from None
    column = calib.get("text_column") or "text"
    if column not in ds.column_names:
        raise ConfigError(
            f"calib.text_column={column!r} is not a column of {dataset!r}; "
            f"valid: {', '.join(ds.column_names)}"
        )
    texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    return texts[: int(calib["num_samples"]) * 4]


def token_windows(ids: Sequence[int], num_samples: int, seq_len: int) -> list[list[int]]:
    """``num_samples`` non-overlapping windows of ``seq_len`` tokens, spread evenly over
    ``ids`` so that every part of the corpus (each license, each document) is represented.
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
