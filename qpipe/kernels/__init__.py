"""W4A16 kernels, packing formats and the torch reference.

Exchange format: ``IntWeights`` (unpacked integers, exact). Converters: ``from_autogptq``,
``from_autoawq``, ``from_compressed_tensors``, ``quantize_rtn``. Module: ``QuantLinear``
(kernel "torch" everywhere, "triton" on CUDA).

Kernel layout "qpipe-w4" v2 (details in ``qpipe/kernels/layout.py``):
    qweight int32 [N, ceil(K/8)]  N-major rows, contiguous along K (one 128-bit load brings 32
                                  consecutive weights of one output), held as 1 KB tiles of
                                  16 rows x 128 columns ([N/16, 16 W]) where the shape allows
                                  (v1 checkpoints: row-major, tiled at load); inside a word the 8
                                  columns are interleaved like AutoAWQ's ([0,2,4,6,1,3,5,7]
                                  nibble -> column) so that two columns land in one fp16x2
                                  register with a single AND-OR (magic-number dequant).
    scales  fp16/bf16 [G, N]      contiguous along N; zeros uint8 [G, N] (asymmetric only,
                                  else 2**(bits-1) = 8); perm int32 [K] (act-order only).
    Act-order (g_idx) checkpoints are re-ordered at load time: columns are sorted by group so
    each group is contiguous; the activation is permuted with ``perm`` at run time.

Kernels (``triton_w4a16.py``): a split-K GEMV for small M (CUDA cores, fp32 accumulation,
self-cleaning fp32 workspace so one launch does it all) and a tensor-core tiled kernel
(``tl.dot`` on the dequantized tile) for larger M. Triton is imported only when the triton
kernel runs, so this package imports on machines without it.
"""

import torch

from qpipe.kernels.formats import from_autoawq, from_autogptq, from_compressed_tensors
from qpipe.kernels.fp8_linear import Fp8Linear
from qpipe.kernels.int8_linear import Int8Linear
from qpipe.kernels.int_linear import IntLinear
from qpipe.kernels.intweights import IntWeights, quantize_rtn
from qpipe.kernels.layout import PackedW4, dequantize_kernel_order, pack_w4, unpack_w4
from qpipe.kernels.quant_linear import QuantLinear, kernel_available

LAYERS = (QuantLinear, Int8Linear, IntLinear, Fp8Linear)


def layer_kernels(model: torch.nn.Module) -> list[str]:
    """The kernels qpipe's quantized layers in ``model`` run on (sorted; empty when it has
    none of them): what a run reports as its ``kernel``."""
    return sorted(
        {getattr(m, "runs_on", m.kernel) for m in model.modules() if isinstance(m, LAYERS)}
    )


__all__ = [
    "LAYERS",
    "Fp8Linear",
    "Int8Linear",
    "IntLinear",
    "IntWeights",
    "PackedW4",
    "QuantLinear",
    "dequantize_kernel_order",
    "from_autoawq",
    "from_autogptq",
    "from_compressed_tensors",
    "kernel_available",
    "layer_kernels",
    "pack_w4",
    "quantize_rtn",
    "unpack_w4",
]
