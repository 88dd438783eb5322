"""Grouped-query attention without copying the KV cache.

transformers' ``sdpa`` attention hands SDPA its native GQA path only when there is no
attention mask; a static KV cache always has one, so every decode step first expands K and V
from the KV heads to all query heads: two copies of the whole cache per layer per token
(8 us a layer of an 8B model on an H200, more than its attention itself). Here the query
heads that share a KV head attend together against the unexpanded cache: in a compiled step
on the GPU through qpipe's split-KV decode kernel (``kernels/decode_attention.py``: the cache
read once, by enough programs to fill the GPU), otherwise by folding them into SDPA's query
axis ([batch, kv_heads, groups * q_len, head_dim], the mask tiled to match). Nothing is
copied.

``grouped_attention(model)`` switches a model on transformers' sdpa to it for the duration
of a ``with`` block (the decode benchmark); anything it does not cover (no mask, dropout,
position bias, per-head masks) takes transformers' own sdpa path.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

from qpipe.kernels.interpreter import interpreting
from qpipe.kernels.ops import decode_attention_supported

NAME = "qpipe_grouped_sdpa"


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    mask = attention_mask
    if (
        groups == 1
        or mask is None
        or mask.dim() != 4
        or mask.shape[1] != 1
        or dropout
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    batch, heads, q_len, head_dim = query.shape
    # The split-KV kernel runs in compiled, graph-captured steps, where its two launches cost
    # nothing per token; an eager step pays Triton's Python launch path for each (more than
    # SDPA's whole call), so eager steps take SDPA on the folded heads below.
    if (
        _KERNEL["available"]
        and torch.compiler.is_compiling()
        and (query.is_cuda or _KERNEL["interpreted"])
        and decode_attention_supported(query, key, mask)
    ):
        scale = scaling if scaling is not None else head_dim**-0.5
        return torch.ops.qpipe.decode_attention(query, key, value, mask, scale), None
    # query head h uses KV head h // groups (transformers' repeat_kv): heads split as
    # [kv_heads, groups], and (group, position) becomes the query axis
    folded = query.reshape(batch, heads // groups, groups * q_len, head_dim)
    if q_len > 1:
        mask = mask.repeat(1, 1, groups, 1)  # row g * q_len + i is position i's mask
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=mask, scale=scaling
    )
    return out.reshape(batch, heads, q_len, head_dim).transpose(1, 2).contiguous(), None


# Set when the attention is registered, outside any compiled region: whether qpipe's decode
# kernel can run (triton importable), and whether Triton's CPU interpreter is on (tests).
_KERNEL = {"available": False, "interpreted": False}


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if importlib.util.find_spec("triton") is not None:
        _KERNEL["available"] = True
        _KERNEL["interpreted"] = interpreting()


@contextlib.contextmanager
def grouped_attention(model: Any) -> Iterator[bool]:
    """Within the block, a model on transformers' sdpa attention runs ``grouped_sdpa``;
    yields whether it switched (other implementations are left as they are)."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa" or not hasattr(model, "set_attn_implementation"):
        yield False
        return
    _register()
    model.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        model.set_attn_implementation(before)
