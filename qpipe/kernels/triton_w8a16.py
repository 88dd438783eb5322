"""Triton W8A16 kernels: y = x @ W.T (+ b) with W held as grouped 8-bit integers.

``W[n, k] = (q[n, k] - z[n, g]) * s[n, g]``, ``g = k // group_size``: q uint8 [N, K] (row-major,
as ``Int8Linear`` holds it), s [N, G] in the activations' dtype, z uint8 [N, G] or none
(symmetric: zero 128), G = ceil(K / group_size).

``_w8_gemv_kernel`` (M <= 4, decode): CUDA cores, split-K, like the W4 GEMV. A program owns
BLOCK_N output rows, up to 4 activation rows and a slice of K; it streams the weight bytes as
int32 words (16-byte loads), the next tile's words, scales, zeros and activations loaded before
the current tile is used. On the GPU each pair of words is 8 weights in 16 PTX instructions for
one row (``_gemv_asm``): ``prmt`` puts bytes under the fp16 exponent of 1024 (1024 + q, two
per register), ``add.f16x2`` makes the exact q - z, and mul/fma with the fp16x2 activation pairs
give the pair's partial, accumulated in fp32 with the group scale. Each tile's activations
enter scaled by a power of two into [1, 2) (exact; 8 products of at most 255 x 2 stay far
inside fp16). Under Triton's interpreter the same kernel runs an fp32
formulation (``USE_ASM=False``).

``_w8_kernel`` (any M; the tuner's choice above M = 4): tensor cores. A program owns BLOCK_N
output rows, BLOCK_M activation
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

from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from qpipe.kernels.interpreter import interpreting
from qpipe.kernels.intweights import w8_kernel_takes
from qpipe.kernels.triton_w4a16 import _epilogue, _gemv_program, _k_range, gemv_rows_asm
from qpipe.kernels.workspace import WORKSPACE

GEMV_MAX_M = 4  # the GEMV takes up to this many activation rows per program (1, 2 or 4)


def _gemv_asm(rows: int) -> str:
    """PTX: two int32 words (8 weight bytes) x ``rows`` activation rows -> ``rows`` fp32
    partial dots. Operands: $0..$(rows-1) the outputs; the two words; zz = fp16x2 -(1024 + z);
    then per row the fp16x2 activation pairs (x0, x1), (x2, x3) of each word. ``prmt``
    selector 0x4140 builds the bytes (q0, 0x64, q1, 0x64): fp16 1024 + q0 and 1024 + q1
    (fp16's step at 1024 is 1, q < 256); adding -(1024 + z) leaves q - z exactly. The eight
    products of a row meet in one fp16x2 register (|x| < 2 after the tile's scaling: at most
    8 x 255 x 2, far inside fp16), then in fp32."""
    w0, w1, zz = f"${rows}", f"${rows + 1}", f"${rows + 2}"
    lines = [
        "{",
        ".reg .b32 t0, t1, t2, t3, a, m;",
        ".reg .b16 lo, hi;",
        ".reg .f32 flo, fhi;",
        "mov.b32 m, 0x64646464;",
        f"prmt.b32 t0, {w0}, m, 0x4140;",
        f"prmt.b32 t1, {w0}, m, 0x4342;",
        f"prmt.b32 t2, {w1}, m, 0x4140;",
        f"prmt.b32 t3, {w1}, m, 0x4342;",
        f"add.rn.f16x2 t0, t0, {zz};",
        f"add.rn.f16x2 t1, t1, {zz};",
        f"add.rn.f16x2 t2, t2, {zz};",
        f"add.rn.f16x2 t3, t3, {zz};",
    ]
    return "\n".join(lines + gemv_rows_asm(rows) + ["}"])


_GEMV_ASM_1 = tl.constexpr(_gemv_asm(1))
_GEMV_ASM_2 = tl.constexpr(_gemv_asm(2))
_GEMV_ASM_4 = tl.constexpr(_gemv_asm(4))
_GEMV_CON_1 = tl.constexpr(",".join(["=f"] * 1 + ["r"] * (3 + 4 * 1)))
_GEMV_CON_2 = tl.constexpr(",".join(["=f"] * 2 + ["r"] * (3 + 4 * 2)))
_GEMV_CON_4 = tl.constexpr(",".join(["=f"] * 4 + ["r"] * (3 + 4 * 4)))


@triton.jit
def _x_tile4(x_ptr, row, stride_xm, M, kt, K, BLOCK_K: tl.constexpr):
    """Activation row ``row``, K tile ``kt`` as loaded, [BLOCK_K / 8, 8] (zeros past M or K):
    the 8 columns of each pair of words."""
    BKD: tl.constexpr = BLOCK_K // 8
    k_idx = kt * BLOCK_K + tl.arange(0, BKD)[:, None] * 8 + tl.arange(0, 8)[None, :]
    k_lim = K * (row < M).to(tl.int32)  # tensor-only mask terms (the interpreter)
    return tl.load(x_ptr + row * stride_xm + k_idx, mask=k_idx < k_lim, other=0.0)


@triton.jit
def _row_pairs(x_raw):
    """One activation row's tile [D, 8] (D word pairs) as the asm's four fp16x2 operands
    [1, D] ((x0, x1), (x2, x3) of the first word, then of the second), and the power of two
    2**e that brings the tile's largest |x| into [1, 2) (the factor of its partials): exact,
    one per tile, so the fp16 products keep full precision whatever the activations' range."""
    x = x_raw.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    e = tl.maximum(amax.to(tl.int32, bitcast=True) & 0x7F800000, 0x00800000)
    inv = (0x7F000000 - e).to(tl.float32, bitcast=True)
    h = (x * inv).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    lo, hi = tl.split(tl.reshape(h, (h.shape[0], 4, 2)))  # even / odd columns
    pair = lo | (hi << 16)  # [D, 4]: (x0, x1), (x2, x3), (x4, x5), (x6, x7)
    a, b = tl.split(tl.reshape(pair, (h.shape[0], 2, 2)))  # a: pairs 0, 2; b: pairs 1, 3
    p0, p2 = tl.split(a)
    p1, p3 = tl.split(b)
    return p0[None, :], p1[None, :], p2[None, :], p3[None, :], e.to(tl.float32, bitcast=True)


@triton.jit
def _dot_words_f32(w0, w1, x, z):
    """Interpreter: word pairs [R, D] . x [D, 8] -> [R, D] fp32 partials sum_j (q_j - z) x_j."""
    x8 = x.to(tl.float32)
    zc = z[:, None]
    d = tl.zeros(w0.shape, dtype=tl.float32)
    for j in tl.static_range(8):
        word = w0 if j < 4 else w1
        col = tl.sum(tl.where(tl.arange(0, 8)[None, :] == j, x8, 0.0), axis=1)  # x[:, j]
        d += (((word >> (8 * (j % 4))) & 0xFF).to(tl.float32) - zc) * col[None, :]
    return d


@triton.jit
def _gemv_loads(w_ptrs, s_ptr, z_ptr, x_ptr, kt, kt1, KW, offs_w, offs_n, n_ok, G, m0,
                stride_xm, M, K, GS: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    """Everything K tile ``kt`` needs, issued but not waited for (masked past ``kt1``)."""
    BKW: tl.constexpr = BLOCK_K // 4
    live = (offs_w * 0 + kt) < kt1  # tensor-only mask terms (interpreter)
    words = tl.load(
        w_ptrs + kt * BKW, mask=n_ok[:, None] & ((kt * BKW + offs_w) < KW)[None, :] & live[None, :],
        other=0,
    )  # fmt: skip
    w0, w1 = tl.split(tl.reshape(words, (words.shape[0], BKW // 2, 2)))  # word pairs
    g = (kt * BLOCK_K) // GS
    row_live = n_ok & ((offs_n * 0 + kt) < kt1)
    s = tl.load(s_ptr + offs_n * G + g, mask=row_live, other=0.0)
    z = s
    if HAS_Z:
        z = tl.load(z_ptr + offs_n * G + g, mask=row_live, other=0)
    x0 = _x_tile4(x_ptr, m0, stride_xm, M, kt, K, BLOCK_K)
    x1 = x0
    x2 = x0
    x3 = x0
    if BLOCK_M >= 2:
        x1 = _x_tile4(x_ptr, m0 + 1, stride_xm, M, kt, K, BLOCK_K)
    if BLOCK_M == 4:
        x2 = _x_tile4(x_ptr, m0 + 2, stride_xm, M, kt, K, BLOCK_K)
        x3 = _x_tile4(x_ptr, m0 + 3, stride_xm, M, kt, K, BLOCK_K)
    return w0, w1, s, z, x0, x1, x2, x3


@triton.jit
def _w8_gemv_kernel(
    x_ptr,
    q_ptr,  # the uint8 weights viewed as int32 [N, K / 4]
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
    BLOCK_M: tl.constexpr,  # 1, 2 or 4 activation rows per program
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,
    USE_ASM: tl.constexpr = True,
):
    BKW: tl.constexpr = BLOCK_K // 4
    BKD: tl.constexpr = BLOCK_K // 8  # word pairs per row per tile
    pid_m, pid_n, pid_k, m0, offs_n, offs_w, n_ok, kt0, kt1 = _gemv_program(
        N, K, BLOCK_M, BLOCK_N, BLOCK_K, BKW, SPLIT_K
    )
    KW = K // 4
    w_ptrs = q_ptr + offs_n[:, None] * KW + offs_w[None, :]
    acc0 = tl.zeros((BLOCK_N, BKD), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BKD), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BKD), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BKD), dtype=tl.float32)
    zero = tl.full((BLOCK_N,), 128.0, tl.float32)  # symmetric: the zero is 128
    # one tile ahead: the loads of tile kt + 1 are in flight while tile kt is computed
    w0_n, w1_n, s_n, z_n, xa_n, xb_n, xc_n, xd_n = _gemv_loads(
        w_ptrs, s_ptr, z_ptr, x_ptr, kt0, kt1, KW, offs_w, offs_n, n_ok, G, m0, stride_xm, M, K,
        GS, HAS_Z, BLOCK_M, BLOCK_K,
    )  # fmt: skip
    for kt in range(kt0, kt1):
        w0, w1, s_raw, z_raw, xa, xb, xc, xd = w0_n, w1_n, s_n, z_n, xa_n, xb_n, xc_n, xd_n
        w0_n, w1_n, s_n, z_n, xa_n, xb_n, xc_n, xd_n = _gemv_loads(
            w_ptrs, s_ptr, z_ptr, x_ptr, kt + 1, kt1, KW, offs_w, offs_n, n_ok, G, m0, stride_xm,
            M, K, GS, HAS_Z, BLOCK_M, BLOCK_K,
        )  # fmt: skip
        s = s_raw.to(tl.float32)
        z = zero
        if HAS_Z:
            z = z_raw.to(tl.float32)
        if USE_ASM:
            h = (-(1024.0 + z)).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            zz = (h | (h << 16))[:, None]
            a0, a1, a2, a3, ua = _row_pairs(xa)
            if BLOCK_M == 1:
                d0 = tl.inline_asm_elementwise(
                    _GEMV_ASM_1, _GEMV_CON_1, [w0, w1, zz, a0, a1, a2, a3],
                    dtype=tl.float32, is_pure=True, pack=1,
                )  # fmt: skip
                acc0 += d0 * (s * ua)[:, None]
            elif BLOCK_M == 2:
                b0, b1, b2, b3, ub = _row_pairs(xb)
                d0, d1 = tl.inline_asm_elementwise(
                    _GEMV_ASM_2, _GEMV_CON_2, [w0, w1, zz, a0, a1, a2, a3, b0, b1, b2, b3],
                    dtype=(tl.float32, tl.float32), is_pure=True, pack=1,
                )  # fmt: skip
                acc0 += d0 * (s * ua)[:, None]
                acc1 += d1 * (s * ub)[:, None]
            else:
                b0, b1, b2, b3, ub = _row_pairs(xb)
                c0, c1, c2, c3, uc = _row_pairs(xc)
                e0, e1, e2, e3, ue = _row_pairs(xd)
                d0, d1, d2, d3 = tl.inline_asm_elementwise(
                    _GEMV_ASM_4, _GEMV_CON_4,
                    [w0, w1, zz, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e0, e1, e2, e3],
                    dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1,
                )  # fmt: skip
                acc0 += d0 * (s * ua)[:, None]
                acc1 += d1 * (s * ub)[:, None]
                acc2 += d2 * (s * uc)[:, None]
                acc3 += d3 * (s * ue)[:, None]
        else:
            s2 = s[:, None]
            acc0 += _dot_words_f32(w0, w1, xa, z) * s2
            if BLOCK_M >= 2:
                acc1 += _dot_words_f32(w0, w1, xb, z) * s2
            if BLOCK_M == 4:
                acc2 += _dot_words_f32(w0, w1, xc, z) * s2
                acc3 += _dot_words_f32(w0, w1, xd, z) * s2
    if BLOCK_M == 1:
        out = tl.sum(acc0, axis=1)[None, :]
    elif BLOCK_M == 2:
        out = tl.trans(tl.join(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1)))
    else:
        r02 = tl.join(tl.sum(acc0, axis=1), tl.sum(acc2, axis=1))
        r13 = tl.join(tl.sum(acc1, axis=1), tl.sum(acc3, axis=1))
        out = tl.trans(tl.reshape(tl.join(r02, r13), (BLOCK_N, 4)))
    offs_m = m0 + tl.arange(0, BLOCK_M)
    tile_id = pid_m * tl.num_programs(1) + pid_n
    _epilogue(
        out, offs_m, offs_n, M, N, stride_ym, y_ptr, b_ptr, ws_ptr, cnt_ptr, tile_id,
        HAS_BIAS, SPLIT_K, pid_k,
    )  # fmt: skip


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
    """One W8A16 launch: kind "mm" (tensor cores, any M) or "gemv" (M <= 4; block_m is then
    taken from M itself)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3  # more stages were slower on the H200 (bench/results/sweep_w8_h200.json)
    kind: str = "mm"

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_k(group_size: int, want: int = 128) -> int:
    bk = want
    while group_size % bk:
        bk //= 2
    return bk


def _split(tiles: int, k_tiles: int, sms: int, waves: float) -> int:
    split = 1
    while tiles * split < waves * sms and split * 2 <= max(1, k_tiles // 2):
        split *= 2
    return split


def gemv_takes(m: int, k: int) -> bool:
    """Whether the GEMV takes the call: at most 4 rows, whole 4-byte words per weight row."""
    return m <= GEMV_MAX_M and k % 4 == 0


def heuristic(
    m: int, n: int, k: int, group_size: int, device: torch.device, kind: str | None = None
) -> W8Config:
    """GEMV for M <= 4 (unless ``kind`` says mm): 64 rows a program, 128-column K tiles, the
    split that gives every SM about four programs. The tensor-core kernel: BLOCK_K 128 bytes of
    a weight row per load (or the group, when smaller), BLOCK_M the smallest MMA side that
    holds M (16..64), and the split that gives every SM about four programs: the weight stream,
    not the MMA, bounds a decode step."""
    bk = _block_k(group_size)
    k_tiles = -(-k // bk)
    sms = _num_sms(device)
    if kind != "mm" and gemv_takes(m, k):
        bn = 64  # the activations' per-tile work is shared by more rows (sm_90 SASS: 4.2
        # instructions per weight at 64 rows and M = 1, 5.2 at 32)
        split = _split(-(-n // bn) * -(-m // 4), k_tiles, sms, 4)
        return W8Config(1, bn, bk, split, num_warps=4, num_stages=1, kind="gemv")
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = 64
    split = _split(-(-n // bn) * -(-m // bm), k_tiles, sms, 4)
    return W8Config(block_m=bm, block_n=bn, block_k=bk, split_k=split)


def candidates(m: int, n: int, k: int, group_size: int, device: torch.device) -> list[W8Config]:
    """The tuner's search space: GEMV tiles x warps x splits for M <= 4, and a few tensor-core
    tiles (which may win at M = 2..4 too); splits between one and sixteen programs per SM."""
    sms = _num_sms(device)
    out: list[W8Config] = []

    def splits(tiles: int, k_tiles: int) -> list[int]:
        ok = [s for s in (1, 2, 4, 8, 16, 32) if s <= k_tiles and sms <= tiles * s <= 16 * sms]
        return ok or [_split(tiles, k_tiles, sms, 4)]

    # the tensor-core kernel first: the tuner checks every candidate against the first one's
    # output, and that kernel has run on GPUs longest
    base_mm = heuristic(m, n, k, group_size, device, kind="mm")
    k_tiles = -(-k // base_mm.block_k)
    for bn, warps in ((64, 4), (128, 4), (128, 8)):
        for split in splits(-(-n // bn) * -(-m // base_mm.block_m), k_tiles):
            out.append(W8Config(base_mm.block_m, bn, base_mm.block_k, split, warps, 3))
    if gemv_takes(m, k):
        for bk in sorted({_block_k(group_size, 128), _block_k(group_size, 256)}):
            k_tiles = -(-k // bk)
            for bn, warps in ((16, 2), (32, 4), (64, 4), (128, 4)):
                for split in splits(-(-n // bn) * -(-m // 4), k_tiles):
                    out.append(W8Config(1, bn, bk, split, warps, 1, kind="gemv"))
    base = heuristic(m, n, k, group_size, device)
    return out if base in out else [*out, base]


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
    return launch(x, qweight, scales, zeros, group_size, bias, cfg)


def launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    cfg: W8Config,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One launch with an explicit configuration (the GEMV or the tensor-core kernel)."""
    m, k = x.shape
    n = qweight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if tuple(y.shape) != (m, n) or y.stride(1) != 1:
        raise ValueError(f"w8a16: out is {tuple(y.shape)}, the product is {(m, n)}")
    if cfg.kind == "gemv":
        if not gemv_takes(m, k) or qweight.data_ptr() % 4:
            raise ValueError(f"the W8 GEMV takes M <= {GEMV_MAX_M} and K % 4 == 0, got {m} x {k}")
        block_m = 1 if m == 1 else (2 if m == 2 else 4)
        n_tiles = triton.cdiv(n, cfg.block_n)
        m_tiles = triton.cdiv(m, block_m)
        ws, cnt = WORKSPACE.for_launch(x.device, cfg.split_k, m, n, n_tiles * m_tiles)
        _w8_gemv_kernel[(m_tiles, n_tiles, cfg.split_k)](
            x, qweight.view(torch.int32), scales, zeros if zeros is not None else scales,
            bias if bias is not None else scales, y, ws, cnt,
            m, n, k, scales.shape[1], x.stride(0), y.stride(0),
            GS=group_size, HAS_Z=zeros is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
            USE_ASM=not interpreting(), num_warps=cfg.num_warps, num_stages=1,
        )  # fmt: skip
        return y
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
