"""GPTQ (Frantar et al., 2022) through llm-compressor's GPTQModifier.

AutoGPTQ is archived; llm-compressor runs the same algorithm (Hessian-guided rounding, column
by column, with optional activation ordering) and writes compressed-tensors checkpoints.
``load`` also reads AutoGPTQ-format folders (``qpipe.backends.legacy``).
"""

from __future__ import annotations

from qpipe.backends.llmc import LlmcBackend


class GptqBackend(LlmcBackend):
    name = "gptq"
