"""How quantized Linear layers sit in memory: the facts a backend states about its weight
format, handed to the estimator so that no method's name or layout is known below the
backends (``qpipe/backends/<method>.py`` builds its format; the memory_budget stage passes it
on, as it passes ``KernelFacts``).

Bytes, not GB: one Linear's weight as held once loaded, with its side tensors (scales, zero
points, absmax), and the transient its matmul adds while the prompt runs through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class WeightFormat(Protocol):
    """A method's quantized Linear layers, priced.

    bits: the width of its quantized layers (a mixed plan gives some layers their own).
    """

    bits: int

    def linear_bytes(self, shape: tuple[int, int], bits: int) -> int:
        """Bytes of one quantized Linear weight ``[out, in]`` at ``bits``, as held on the
        device once loaded: payload and side tensors, the bias not included."""
        ...

    def matmul_transient_bytes(self, shape: tuple[int, int], tokens: int) -> int:
        """What one matmul of such a layer over ``tokens`` rows holds beyond its input and
        output while it runs (quantized activations, an integer product, a dequantized
        weight); 0 for kernels that read the packed weight directly."""
        ...


@dataclass(frozen=True)
class DenseFormat:
    """Weights left in the run's dtype: ``quant=none``, and what 16 bits means in a plan."""

    dtype_bytes: int
    bits: int = 16

    def linear_bytes(self, shape: tuple[int, int], bits: int) -> int:
        return math.prod(shape) * self.dtype_bytes

    def matmul_transient_bytes(self, shape: tuple[int, int], tokens: int) -> int:
        return 0
