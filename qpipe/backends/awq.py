"""AWQ (Lin et al., 2023) through llm-compressor: AWQModifier searches per-channel scales that
protect the weights salient to the activations, then QuantizationModifier rounds.

AutoAWQ is deprecated; checkpoints are compressed-tensors. ``load`` also reads AutoAWQ GEMM
folders (``qpipe.backends.legacy``).
"""

from __future__ import annotations

from qpipe.backends.llmc import LlmcBackend


class AwqBackend(LlmcBackend):
    name = "awq"
