"""GPTQ (Frantar et al., 2022) through llm-compressor's GPTQModifier.

AutoGPTQ is archived; llm-compressor runs the same algorithm (Hessian-guided rounding, column
by column, with optional activation ordering) and writes compressed-tensors checkpoints.
``load`` also reads AutoGPTQ-format folders (``qpipe.backends.legacy``).
"""

from __future__ import annotations

from typing import Any

from qpipe.backends.base import QpipeLayerFacts
from qpipe.backends.llmc import LlmcBackend, validate_kernel


class GptqBackend(QpipeLayerFacts, LlmcBackend):
    name = "gptq"
    bits_supported = (2, 3, 4, 8)
    validate_kernel = staticmethod(validate_kernel)

    def calibrates(self, quant: dict[str, Any]) -> bool:
        return True
