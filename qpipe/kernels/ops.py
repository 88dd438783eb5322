"""qpipe's Triton kernels as PyTorch custom ops, so ``torch.compile(fullgraph=True)`` sees each
as one opaque node (no graph break, and Inductor never re-generates the Triton source, whose
inline PTX it cannot print) and CUDA-graph capture replays the launch as is.

``torch.ops.qpipe.w4a16_linear(x, qweight, scales, zeros, bias, group_size)``: x [M, K] in
kernel column order, the qpipe-w4 tensors of ``QuantLinear``; returns a fresh [M, N] tensor.
The split-K workspace it uses is internal (its counters all-zero between calls), so the op mutates none of
its arguments. Triton is imported on the first call only: the op registers on machines without it.

``torch.ops.qpipe.w8a16_linear(x, qweight, scales, zeros, bias, group_size)``: the same for
``Int8Linear``'s grouped 8-bit weights (``triton_w8a16.py``).

``torch.ops.qpipe.e4m3_gemv(x, weight, scale, bias)``: ``Fp8Linear``'s e4m3 weights and fp32
channel scales times at most 4 activation rows, weight-only (``triton_fp8.py``).

``torch.ops.qpipe.decode_attention(q, k, v, mask, scale)``: grouped-query attention of a few
new positions against a KV cache, [B, S, H, D] (``decode_attention.py``).

``torch.ops.qpipe.add_rms_norm(x, residual, weight, eps)``: ``(rmsnorm(x + residual) * weight,
x + residual)`` in one kernel, transformers' RMSNorm arithmetic (``add_rms_norm.py``).
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
    from qpipe.kernels.tuning import w4a16_matmul

    return w4a16_matmul(x, qweight, scales, zeros, group_size, bias)


@w4a16_linear.register_fake
def _w4a16_linear_fake(x, qweight, scales, zeros, bias, group_size):
    return x.new_empty(x.shape[0], scales.shape[1])  # qweight may be tiled: N / 16 rows


@torch.library.custom_op("qpipe::w8a16_linear", mutates_args=())
def w8a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    from qpipe.kernels.tuning import w8a16_tuned

    return w8a16_tuned(x, qweight, scales, zeros, group_size, bias)


@w8a16_linear.register_fake
def _w8a16_linear_fake(x, qweight, scales, zeros, bias, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("qpipe::e4m3_gemv", mutates_args=())
def e4m3_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    from qpipe.kernels.tuning import e4m3_gemv_tuned

    return e4m3_gemv_tuned(x, weight, scale, bias)


@e4m3_gemv.register_fake
def _e4m3_gemv_fake(x, weight, scale, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


DECODE_ATTENTION_MAX_ROWS = 64  # query heads per KV head x new positions, per program


def decode_attention_supported(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None
) -> bool:
    """Whether ``decode_attention`` takes this call (else the caller's SDPA path runs):
    q [B, H, S, D] fp16/bf16 with D a power of two in [16, 256], at most 64 query rows per KV
    head, and a boolean [B or 1, 1, S, L] mask (or none for a single new position)."""
    b, h, s, d = query.shape
    hkv = key.shape[1]
    if h % hkv or (h // hkv) * s > DECODE_ATTENTION_MAX_ROWS or d & (d - 1) or not 16 <= d <= 256:
        return False
    if query.dtype not in (torch.float16, torch.bfloat16) or key.dtype != query.dtype:
        return False
    if mask is None:
        return s == 1  # no mask with several new positions means causal: not this kernel
    return mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1


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


@torch.library.custom_op("qpipe::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm fused (``add_rms_norm.py``): (normed, sum), shaped like x."""
    from qpipe.kernels.add_rms_norm import add_rms_norm as run

    return run(x, residual, weight, eps)


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format
    )
