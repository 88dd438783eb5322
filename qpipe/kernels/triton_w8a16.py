"""Triton W8A16 kernel: y = x @ W.T (+ b) with W held as grouped 8-bit integers.

``W[n, k] = (q[n, k] - z[n, g]) * s[n, g]``, ``g = k // group_size``: q uint8 [N, K] (row-major,
as ``Int8Linear`` holds it), s [N, G] in the activations' dtype, z uint8 [N, G] or none
(symmetric: zero 128), G = ceil(K / group_size).

One tensor-core kernel for every M. A program owns BLOCK_N output rows, BLOCK_M activation
rows and a contiguous slice of K (split-K). The weight tile [BLOCK_N, BLOCK_K] is the *left*
operand ("swap AB": acc = W x^T), so a decode step's M of 1..16 lands on the MMA's narrow side
and BLOCK_N fills the wide one; q - z is an integer in [-255, 255], exact in fp16 and bf16, so
the MMA sees the exact integer weights and the group scale multiplies the fp32 partial once per
tile. A K tile never straddles a group (BLOCK_K divides the group size). At 1 byte per weight
the kernel is bound by the weight stream, which Triton's multi-stage pipeline (cp.async) keeps
in flight; split-K gives small-N layers enough programs to fill the SMs.

Split-K partials meet in the W4 kernels' workspace through the same epilogue (the last program
of a tile adds them up, so no memset or second kernel runs): see ``triton_w4a16.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qpipe.kernels.interpreter import interpreting
from qpipe.kernels.intweights import w8_kernel_takes
from qpipe.kernels.triton_w4a16 import WORKSPACE, _epilogue, _k_range


@triton.jit
def _w8_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    G,
    stride_xm,
    stride_ym,
    GS: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,
    DOT_F32: tl.constexpr = False,  # the interpreter's dot: fp32 operands
    F16_BITS: tl.constexpr = False,  # fp16 activations: build 1024 + q by OR-ing the exponent
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    m_ok = offs_m < M
    kt0, kt1 = _k_range(K, pid_k, BLOCK_K, SPLIT_K)
    q_ptrs = q_ptr + offs_n[:, None] * K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in range(kt0, kt1):
        k0 = kt * BLOCK_K
        k_ok = (k0 + offs_k) < K
        q = tl.load(q_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0)
        xt = tl.load(x_ptrs + k0, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        g = k0 // GS
        s = tl.load(s_ptr + offs_n * G + g, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + offs_n * G + g, mask=n_ok, other=0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 128.0, tl.float32)
        if F16_BITS:
            # fp16 1024 + q straight from the byte's bits (no int->float convert per weight),
            # minus 1024 + z: exact integers in [-255, 255]
            qh = (q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
            part = tl.dot(qh - (z + 1024.0).to(tl.float16)[:, None], xt)
        elif DOT_F32:
            part = tl.dot(q.to(tl.float32) - z[:, None], xt.to(tl.float32))
        else:
            part = tl.dot((q.to(tl.float32) - z[:, None]).to(x_ptr.dtype.element_ty), xt)
        acc += part * s[:, None]
    tile_id = pid_m * tl.cdiv(N, BLOCK_N) + pid_n
    _epilogue(
        tl.trans(acc), offs_m, offs_n, M, N, stride_ym, y_ptr, b_ptr, ws_ptr, cnt_ptr,
        tile_id, HAS_BIAS, SPLIT_K, pid_k,
    )  # fmt: skip


@dataclass(frozen=True)
class W8Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3  # more stages were slower on the H200 (bench/results/sweep_w8_h200.json)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def heuristic(m: int, n: int, k: int, group_size: int, device: torch.device) -> W8Config:
    """BLOCK_K 128 bytes of a weight row per load (or the group, when smaller), BLOCK_M the
    smallest MMA side that holds M (16..64), and the power-of-two split-K that gives every SM
    about four programs: the weight stream, not the MMA, bounds a decode step."""
    bk = 128
    while group_size % bk:
        bk //= 2
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = 64
    tiles = -(-n // bn) * -(-m // bm)
    k_tiles = -(-k // bk)
    split = 1
    while tiles * split < 4 * _num_sms(device) and split * 2 <= max(1, k_tiles // 2):
        split *= 2
    return W8Config(block_m=bm, block_n=bn, block_k=bk, split_k=split)


def w8a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    cfg: W8Config | None = None,
) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W.T (+ bias): x fp16/bf16 (fp32 under the interpreter), qweight
    uint8 [N, K], scales [N, K / group_size] in x's dtype, zeros uint8 or None (zero 128)."""
    m, k = x.shape
    n = qweight.shape[0]
    groups = -(-k // group_size)
    if qweight.shape[1] != k or not w8_kernel_takes(k, group_size) or scales.shape[1] != groups:
        raise ValueError(
            f"w8a16: x has {k} columns, qweight {tuple(qweight.shape)}, group size {group_size}"
        )
    cfg = cfg or heuristic(m, n, k, group_size, x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    n_tiles = triton.cdiv(n, cfg.block_n)
    m_tiles = triton.cdiv(m, cfg.block_m)
    ws, cnt = WORKSPACE.for_launch(x.device, cfg.split_k, m, n, n_tiles * m_tiles)
    _w8_kernel[(n_tiles, cfg.split_k, m_tiles)](
        x, qweight, scales, zeros if zeros is not None else scales,
        bias if bias is not None else scales, y, ws, cnt,
        m, n, k, scales.shape[1], x.stride(0), y.stride(0),
        GS=group_size, HAS_Z=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        DOT_F32=interpreting(), F16_BITS=x.dtype == torch.float16 and not interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y
