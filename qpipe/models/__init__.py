"""Model sources: local HF folder, embedded GGUF, hub id, or random weights from a config."""

from qpipe.models.source import (
    load_config,
    load_tokenizer,
    materialize,
    model_class,
    model_files,
    random_model,
)

__all__ = [
    "load_config",
    "load_tokenizer",
    "materialize",
    "model_class",
    "model_files",
    "random_model",
]
