"""Triton W4A16 kernels over the qpipe-w4 layout (see ``layout.py``): y = x @ W.T (+ b).

Two kernels, one epilogue:

* ``_gemv_kernel`` (small M): CUDA-core dot products. Each program owns BLOCK_N output rows
  and a slice of K (split-K), streams [BLOCK_N, BLOCK_K / 8] int32 words with 16-byte loads,
  and turns each nibble into the exact float ``q - z`` with the magic-number trick
  (``bits(q | 0x4B000000) - (2**23 + z)``: one OR and one FADD, no int->float convert).
  The group scale is applied once per word after the 8-wide in-thread dot, fp32 throughout.
* ``_mm_kernel`` (larger M): tensor cores. The dequantized weight tile [BLOCK_N, BLOCK_K] is
  the *left* operand, the activation tile the right one ("swap AB": acc = W x^T), so the
  small M lands on the MMA's narrow side and BLOCK_N >= 64 fills its wide side.

Split-K reduction happens inside the one launch: partial sums go to an fp32 workspace with
atomic adds; the last program of an output tile (a ticket counter) reads the sum back and
zeroes it, adds the bias, casts and stores, and resets the counter. The
workspace is therefore all-zero between launches and no memset kernel is needed, which
matters at M=1 where a whole layer takes a few microseconds. One workspace per device: do
not run two of these kernels concurrently on different streams of the same device.

A K tile never straddles a group (BLOCK_K divides the group size), so a tile has one scale and
one zero per output row and the kernels never gather them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

# M at or below this runs the split-K GEMV; above it, the tensor-core kernel.
GEMV_MAX_M = 8


@triton.jit
def _epilogue(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    stride_ym,
    y_ptr,
    b_ptr,
    ws_ptr,
    cnt_ptr,
    tile_id,
    HAS_BIAS: tl.constexpr,
    SPLIT_K,
):
    """acc: fp32 [BLOCK_M, BLOCK_N] partial (SPLIT_K > 1) or full result for y[offs_m, offs_n]."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        # Every thread's adds must be issued before the ticket is taken (release below).
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            # Read the finished sum at L2 (an atomic add of 0 returns it), then re-zero it.
            total = tl.atomic_add(ws_ptrs, tl.zeros_like(acc), mask=mask, sem="relaxed")
            tl.store(ws_ptrs, tl.zeros_like(acc), mask=mask)
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr + tile_id, 0)


@triton.jit
def _k_range(K, pid_k, BLOCK_K: tl.constexpr, SPLIT_K):
    """The K tiles [kt0, kt1) of split ``pid_k``: contiguous, as even as possible."""
    n_kt = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(n_kt, SPLIT_K)
    kt0 = pid_k * per
    kt1 = tl.minimum(kt0 + per, n_kt)
    return kt0, kt1


@triton.jit
def _nib(words, SHIFT: tl.constexpr):
    """Nibble at bit SHIFT of each word as the fp32 1 + q/16: the nibble is moved to the top
    four mantissa bits of 1.0 (shift, then one AND-OR), an exact value with no int->float
    convert. Keeping the offset at 1.0 rather than the usual 2**23 is what later lets the
    dot subtract it per word (sum x) instead of per weight, without cancellation."""
    if SHIFT <= 19:  # noqa: SIM108 (constexpr branches; keep them plain for Triton)
        t = words << (19 - SHIFT)
    else:
        t = words >> (SHIFT - 19)
    return ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _unpack_f(words):
    """int32 [R, W] -> fp32 [R, W, 8] holding 1 + q/16 for column 8w + j at [:, w, j].

    The 8 nibbles are joined into the new last axis (tl.join keeps it inside one thread), so
    no data moves between threads.
    """
    words = words.to(tl.uint32, bitcast=True)  # logical shifts
    # tl.join appends its new axis last, so the first join becomes the most significant of
    # the three size-2 axes: nibble j = 4 * (first) + 2 * (second) + (third).
    even = tl.join(
        tl.join(_nib(words, 0), _nib(words, 16)), tl.join(_nib(words, 8), _nib(words, 24))
    )
    odd = tl.join(
        tl.join(_nib(words, 4), _nib(words, 20)), tl.join(_nib(words, 12), _nib(words, 28))
    )
    return tl.reshape(tl.join(even, odd), (words.shape[0], words.shape[1], 8))


@triton.jit
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    KW,
    stride_xm,
    stride_ym,
    GS: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # always 1: one activation row per program
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,  # runtime: one compiled kernel serves every split
):
    BKW: tl.constexpr = BLOCK_K // 8
    # The row of x is the fastest grid axis: the programs of all rows that read one weight
    # tile run side by side, so rows after the first find the tile in L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m + tl.arange(0, 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BKW)
    offs_j = tl.arange(0, 8)
    n_ok = offs_n < N
    kt0, kt1 = _k_range(K, pid_k, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    for kt in range(kt0, kt1):
        w_idx = kt * BKW + offs_w
        words = tl.load(
            qw_ptr + offs_n[:, None] * KW + w_idx[None, :],
            mask=n_ok[:, None] & (w_idx < KW)[None, :],
            other=0,
        )
        g = (kt * BLOCK_K) // GS
        s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 8.0, tl.float32)
        f = _unpack_f(words)  # 1 + q/16
        k_idx = kt * BLOCK_K + offs_w[:, None] * 8 + offs_j[None, :]
        x = tl.load(x_ptr + pid_m * stride_xm + k_idx, mask=k_idx < K, other=0.0).to(tl.float32)
        xs = tl.sum(x, axis=1)  # per word, shared by all rows
        # sum_j (q_j - z) x_j = 16 * sum_j f_j x_j - (16 + z) * sum_j x_j; the 8-wide dot stays
        # inside one thread, the offset, zero and group scale are paid once per word.
        d = tl.sum(f * x[None, :, :], axis=2)
        acc += (16.0 * d - (16.0 + z)[:, None] * xs[None, :]) * s[:, None]
    out = tl.sum(acc, axis=1)[None, :]
    tile_id = pid_m * tl.num_programs(1) + pid_n
    _epilogue(
        out, offs_m, offs_n, M, N, stride_ym, y_ptr, b_ptr, ws_ptr, cnt_ptr, tile_id,
        HAS_BIAS, SPLIT_K,
    )  # fmt: skip


@triton.jit
def _mm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    KW,
    stride_xm,
    stride_ym,
    GS: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,  # runtime: one compiled kernel serves every split
    DOT_F32: tl.constexpr = False,
):
    BKW: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BKW)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    dt = x_ptr.dtype.element_ty
    kt0, kt1 = _k_range(K, pid_k, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in range(kt0, kt1):
        w_idx = kt * BKW + offs_w
        words = tl.load(
            qw_ptr + offs_n[:, None] * KW + w_idx[None, :],
            mask=n_ok[:, None] & (w_idx < KW)[None, :],
            other=0,
        )
        k_idx = kt * BLOCK_K + offs_k
        xt = tl.load(
            x_ptr + offs_m[None, :] * stride_xm + k_idx[:, None],
            mask=m_ok[None, :] & (k_idx < K)[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_M]: x^T, the MMA's right operand
        g = (kt * BLOCK_K) // GS
        s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 8.0, tl.float32)
        f = tl.reshape(_unpack_f(words), (BLOCK_N, BLOCK_K))
        # (q - z) * s in fp32 (16 f - 16 - z is exact), one rounding to the activation dtype:
        # the same weights as the torch reference
        w = ((16.0 * f - (16.0 + z)[:, None]) * s[:, None]).to(dt)
        # Triton's CPU interpreter mis-multiplies bf16 dots; fp32 is exact there
        if DOT_F32:  # noqa: SIM108
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
        else:
            acc = tl.dot(w, xt, acc)
    tile_id = pid_m * tl.num_programs(0) + pid_n
    _epilogue(
        tl.trans(acc), offs_m, offs_n, M, N, stride_ym, y_ptr, b_ptr, ws_ptr, cnt_ptr, tile_id,
        HAS_BIAS, SPLIT_K,
    )  # fmt: skip


# -- launch --------------------------------------------------------------------------------


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _Workspace:
    """Per-device fp32 partial sums + int32 tickets, all zero between launches (see the
    module docstring). Grown (re-allocated zeroed) when a larger problem comes along, which
    must not happen inside CUDA-graph capture: run a layer once before capturing it."""

    def __init__(self) -> None:
        self._bufs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(
        self, device: torch.device, n_acc: int, n_cnt: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ws, cnt = self._bufs.get(device, (None, None))
        if ws is None or ws.numel() < n_acc or cnt.numel() < n_cnt:
            ws_n = max(n_acc, 1 << 16, 0 if ws is None else 2 * ws.numel())
            cnt_n = max(n_cnt, 1 << 12, 0 if cnt is None else 2 * cnt.numel())
            ws = torch.zeros(ws_n, dtype=torch.float32, device=device)
            cnt = torch.zeros(cnt_n, dtype=torch.int32, device=device)
            self._bufs[device] = (ws, cnt)
        return ws, cnt


WORKSPACE = _Workspace()


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. kind "gemv" ignores block_m (one row per program)."""

    kind: str
    block_n: int
    block_k: int
    split_k: int
    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def legal_block_k(group_size: int, want: int) -> int:
    """Largest power of two <= want that divides the group size (>= 16, tl.dot's minimum):
    a K tile then never straddles two groups."""
    bk = want
    while bk > 16 and group_size % bk:
        bk //= 2
    if group_size % bk:
        raise ValueError(f"group size {group_size} must be a multiple of 16 for the triton kernel")
    return bk


def launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    cfg: KernelConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W.T (+ bias) with one explicit configuration."""
    m, k = x.shape
    n, kw = qweight.shape
    if kw * 8 < k:
        raise ValueError(f"qweight holds {kw * 8} columns, x has {k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    block_k = legal_block_k(group_size, cfg.block_k)
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    n_tiles = triton.cdiv(n, cfg.block_n)
    if cfg.kind == "gemv":
        block_m, grid = 1, (m, n_tiles, cfg.split_k)
        kernel, extra = _gemv_kernel, {}
    else:
        block_m = cfg.block_m
        grid = (n_tiles, cfg.split_k, triton.cdiv(m, block_m))
        kernel = _mm_kernel
        extra = {"DOT_F32": True} if interpreting() else {}
    ws, cnt = WORKSPACE.get(
        x.device, m * n if cfg.split_k > 1 else 1, n_tiles * triton.cdiv(m, block_m)
    )
    kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales,
        bias if bias is not None else scales, y, ws, cnt,
        m, n, k, kw, x.stride(0), y.stride(0),
        GS=group_size, HAS_Z=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT_K=cfg.split_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra,
    )  # fmt: skip
    return y


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    cfg: KernelConfig | None = None,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x fp16/bf16 [M, K] (kernel column order) and W in the
    qpipe-w4 layout; the configuration comes from the autotuner unless given."""
    if cfg is None:
        from qpipe.kernels.tuning import TUNER

        n, k = qweight.shape[0], x.shape[1]
        cfg = TUNER.choose(
            x, n, k, group_size, zeros is not None,
            lambda c: launch(x, qweight, scales, zeros, group_size, bias, c),
        )  # fmt: skip
    return launch(x, qweight, scales, zeros, group_size, bias, cfg)
