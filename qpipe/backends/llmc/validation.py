"""What a ``quant`` value for llm-compressor may be, checked before any heavy work: the
options every method shares here; each method's own (its keys, bit widths, group sizes,
ranges) on its backend class (see ``method.py``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from qpipe.backends.llmc.method import llmc_method
from qpipe.config.schema import QUANT_COMMON
from qpipe.errors import ConfigError

CT_FORMAT = "compressed-tensors"
# Group sizes our formats accept: compressed-tensors takes any divisor of K, but qpipe's
# Triton kernel tiles K in multiples of 16 that must divide the group; regroup picks the
# largest of these that divides K (16 only for odd widths such as 688 = 43 x 16).
LEGAL_GROUP_SIZES = [16, 32, 64, 128, 256]


def one_of(values: Sequence[Any]) -> str:
    """``a, b or c``: the valid values as an error message lists them."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_quant(quant: Mapping[str, Any]) -> None:
    """One-line ConfigError naming the bad ``quant`` value and the valid ones. Cheap: no
    library import, no weights; call it before any heavy work."""
    method = quant.get("method")
    facts = llmc_method(str(method))
    keys = {*QUANT_COMMON, *(f.name for f in fields(facts.Options))}
    unknown = sorted(set(quant) - keys)
    if unknown:
        raise ConfigError(
            f"quant.{unknown[0]} is not an option of quant.method={method}; "
            f"valid: {', '.join(sorted(keys))}"
        )
    bits = quant.get("bits")
    if bits not in facts.bit_widths or not is_int(bits):
        raise ConfigError(
            f"quant.bits={bits!r} is not valid for {method}; use {one_of(facts.bit_widths)}"
        )
    gs = quant.get("group_size")
    legal = facts.legal_group_sizes(dict(quant)) or []
    if not is_int(gs) or (gs != 0 and gs not in legal):
        sizes = f"one of {', '.join(map(str, legal))} or 0" if legal else "0"
        raise ConfigError(
            f"quant.group_size={gs!r} is not valid; use {sizes} (one scale per output channel)"
        )
    if not isinstance(quant.get("symmetric", True), bool):
        raise ConfigError(
            f"quant.symmetric={quant.get('symmetric')!r} is not valid; use true or false"
        )
    facts.check_options(quant)


def llmcompressor_missing() -> str | None:
    """Why llm-compressor cannot be used here (None when it can)."""
    if importlib.util.find_spec("llmcompressor") is None:
        return "llm-compressor is not installed: pip install 'llmcompressor>=0.14,<0.15'"
    return None
