"""The calibration data ``oneshot`` runs on (for the methods that calibrate): token windows of
the ``calib`` texts, or random token ids for a model saved without a tokenizer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qpipe.backends.base import QuantizeRequest
from qpipe.backends.llmc.layers import decoder_blocks, linear_names
from qpipe.config.safety import trust_remote_code
from qpipe.corpora.calibration import (
    BUILTIN,
    builtin_texts,
    load_calib_texts,
    synthetic_windows,
    token_windows,
)
from qpipe.errors import ConfigError


def calibration_texts(calib: Mapping[str, Any]) -> list[str]:
    """The texts of the ``calib`` config group (see ``qpipe.corpora.calibration``)."""
    return load_calib_texts(calib)


class PretokenizedOnly:
    """Stands in for a tokenizer when the source folder has none (random-weight models).
    oneshot wants a processor object, but it only tokenizes text; our data is token ids."""


def calibration_data(
    tokenizer: Any, request: QuantizeRequest, vocab_size: int
) -> tuple[Any, dict[str, Any]]:
    """A tokenized ``datasets.Dataset`` of calibration windows and what it holds."""
    from datasets import Dataset

    n, seq_len = int(request.calib_samples), int(request.calib_seq_len)
    if tokenizer is None:
        windows, source = synthetic_windows(vocab_size, n, seq_len), "random token ids"
    else:
        texts = request.calib_texts or builtin_texts()
        source = "texts" if request.calib_texts else f"builtin:{BUILTIN}"
        ids: list[int] = []
        for text in texts:  # one document after another, like one long text
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        windows = token_windows(ids, n, seq_len)
        if not windows:
            raise ConfigError("the calibration texts are empty; set calib.dataset=null")
    ds = Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]}
    )
    details = {
        "calib.source": source,
        "calib.samples": len(windows),
        "calib.seq_len": seq_len,
        "calib.tokens": sum(len(w) for w in windows),
    }
    return ds, details


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def source_tokenizer(source: Path) -> Any:
    """The tokenizer saved in ``source``, or None when the folder has none."""
    from transformers import AutoTokenizer

    # transformers 5 makes an empty tokenizer from config.json alone: look for its files.
    if not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code())
    except (OSError, ValueError, TypeError):
        # No tokenizer files: a random-weight model folder. Calibration falls back to
        # random token ids, which carry no meaning for such a model anyway.
        return None


def calibration_kwargs(
    request: QuantizeRequest, model: torch.nn.Module, tokenizer: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """oneshot's dataset arguments for a method that calibrates, and what the data holds."""
    vocab = int(
        getattr(model.config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings
    )
    ds, details = calibration_data(tokenizer, request, vocab)
    blocks = decoder_blocks(model, request.targets or linear_names(model))
    layer = blocks[1] if blocks else None
    kwargs = {
        "dataset": ds,
        "num_calibration_samples": len(ds),
        "max_seq_length": int(request.calib_seq_len),
        # Shuffling draws from the global RNG; every window is used anyway.
        "shuffle_calibration_samples": False,
        # One decoder layer at a time on the accelerator, activations cached between layers:
        # what keeps an 8B GPTQ/AWQ at minutes. Named, not inferred, so that a VLM's vision
        # layers (which text calibration never runs) are not made pipeline stages.
        "pipeline": "sequential",
    }
    if layer is not None:
        kwargs["sequential_targets"] = [layer]
    details["calib.sequential_targets"] = layer or "library default"
    return kwargs, details
