"""The dimensions of a model that size its KV cache and activations (the language model's, for
VLMs), read from its transformers config: what the estimator and the fine-tuning pricing
share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchDims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    decoder: bool


def arch_dims(config: Any) -> ArchDims:
    """The dimensions that size the KV cache and activations (the language model's, for VLMs)."""
    text = getattr(config, "text_config", None) or config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    decoder = not getattr(text, "is_encoder_decoder", False) and text.model_type not in (
        "bert",
        "roberta",
        "distilbert",
        "xlm-roberta",
        "deberta",
        "deberta-v2",
        "modernbert",
    )
    return ArchDims(
        layers=text.num_hidden_layers,
        hidden=hidden,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=getattr(text, "intermediate_size", 4 * hidden),
        vocab=text.vocab_size,
        decoder=decoder,
    )
