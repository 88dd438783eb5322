"""Residual add and RMSNorm in one kernel: ``h = x + residual``, ``y = rmsnorm(h) * weight``.

A decoder layer adds each sublayer's output back into the residual stream and normalizes the
sum for the next sublayer. Unfused that is an add, a cast, a square, a mean, an rsqrt, two
multiplies and two casts: each its own launch in an eager decode step, each re-reading the row.
Here one program owns one row: it reads x and residual once, writes h and y once.

The arithmetic is transformers' ``LlamaRMSNorm`` / ``Qwen3RMSNorm`` on ``residual + x``: the add
rounded to the input dtype, the statistics in fp32 (mean of squares, rsqrt of it plus eps), the
normalized row rounded to the input dtype before the weight multiplies it (itself rounded once).
Only the order of the fp32 sum of squares differs from torch's.

Inputs: x and residual [..., N] of one dtype (fp16/bf16/fp32), last dim contiguous; weight [N]
of the same dtype. Returns (y, h), fresh tensors shaped like x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rne(v, dtype: tl.constexpr):
    """fp32 -> dtype rounded to nearest even, as torch rounds. For bf16 by hand (on the bits,
    as torch's c10 does): the GPU's cast does the same, but Triton's CPU interpreter truncates
    or rounds ties up, so the tests could not compare bf16 results bit for bit otherwise."""
    if dtype == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return v.to(dtype)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    h_ptr,
    stride_x,
    stride_r,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0)
    r = tl.load(r_ptr + row * stride_r + cols, mask=inside, other=0.0)
    # the add rounds once, like torch's
    h = _rne(x.to(tl.float32) + r.to(tl.float32), x.dtype)
    tl.store(h_ptr + row * n_cols + cols, h, mask=inside)
    hf = h.to(tl.float32)
    variance = tl.sum(hf * hf, axis=0) / n_cols
    normed = _rne(hf * tl.math.rsqrt(variance + eps), x.dtype)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    y = _rne(normed.to(tl.float32) * w.to(tl.float32), x.dtype)
    tl.store(y_ptr + row * n_cols + cols, y, mask=inside)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual), one program per row."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    r2 = residual.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(n)
        warps = 4 if block <= 2048 else 8  # 4096-wide rows: 16 elements a thread
        _add_rms_norm_kernel[(rows,)](
            x2, r2, weight, y, h, x2.stride(0), r2.stride(0), n, eps, BLOCK=block, num_warps=warps
        )
    return y.view(x.shape), h.view(x.shape)
