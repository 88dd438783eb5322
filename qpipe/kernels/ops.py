"""qpipe's Triton kernels as PyTorch custom ops. The W4A16 matmul as one, so ``torch.compile(fullgraph=True)`` sees one opaque
node (no graph break, and Inductor never re-generates the Triton source, whose inline PTX it
cannot print) and CUDA-graph capture replays the launch as is.

``torch.ops.qpipe.w4a16_linear(x, qweight, scales, zeros, bias, group_size)``: x [M, K] in
kernel column order, the qpipe-w4 tensors of ``QuantLinear``; returns a fresh [M, N] tensor.
The split-K workspace it uses is internal and all-zero between calls, so the op mutates none of
its arguments. Triton is imported on the first call only: the op registers on machines without it.

``torch.ops.qpipe.decode_attention(q, k, v, mask, scale)``: grouped-query attention of a few
new positions against a KV cache, [B, S, H, D] (``decode_attention.py``).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("qpipe::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    from qpipe.kernels.triton_w4a16 import w4a16_matmul

    return w4a16_matmul(x, qweight, scales, zeros, group_size, bias)


@w4a16_linear.register_fake
def _w4a16_linear_fake(x, qweight, scales, zeros, bias, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("qpipe::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Split-KV attention of a few query positions (``decode_attention.py``): [B, S, H, D]."""
    from qpipe.kernels.decode_attention import decode_attention as run

    return run(query, key, value, mask, scale)


@decode_attention.register_fake
def _decode_attention_fake(query, key, value, mask, scale):
    b, h, s, d = query.shape
    return query.new_empty(b, s, h, d)
