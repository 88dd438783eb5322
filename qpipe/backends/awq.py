"""AWQ (Lin et al., 2023) through llm-compressor: AWQModifier searches per-channel scales that
protect the weights salient to the activations, then QuantizationModifier rounds.

AutoAWQ is deprecated; checkpoints are compressed-tensors. ``load`` also reads AutoAWQ GEMM
folders (``qpipe.backends.legacy``).
"""

from __future__ import annotations

from typing import Any

from qpipe.backends.base import QpipeLayerFacts
from qpipe.backends.llmc import LlmcBackend, validate_kernel


class AwqBackend(QpipeLayerFacts, LlmcBackend):
    name = "awq"
    bits_supported = (4, 8)
    validate_kernel = staticmethod(validate_kernel)

    def calibrates(self, quant: dict[str, Any]) -> bool:
        return True
