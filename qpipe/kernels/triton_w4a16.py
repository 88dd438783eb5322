"""Triton W4A16 kernels over the qpipe-w4 layout (see ``layout.py``): y = x @ W.T (+ b).

Two kernels, one epilogue:

* ``_gemv_kernel`` (M <= 4, decode): CUDA cores. A program owns BLOCK_N output rows, up to 4
  activation rows and a slice of K (split-K); it streams [BLOCK_N, BLOCK_K / 8] int32 words with
  16-byte loads, the next tile's words loaded before the current one is used. On the GPU the
  dequant + dot of each word is 17 PTX instructions for 8 weights (``_GEMV_ASM``): the
  interleaved nibble order lets one ``lop3`` (AND-OR with 0x64006400) turn two columns into the
  fp16x2 pair (1024 + q), one ``add/fma.f16x2`` makes the exact integers ``q - z``, and four
  ``fma.f16x2`` do the 8-wide dot. Activations enter pre-scaled by 1/64 (exact) so the fp16
  partial of a word cannot overflow; every word's partial is then accumulated in fp32 with the
  group scale (times 64). Under Triton's interpreter (no inline PTX) the same kernel runs a
  pure-Triton fp32 formulation instead (``USE_ASM=False``).
* ``_mmp_kernel`` (small M > 1, group sizes that are multiples of 128): tensor cores fed one
  nibble plane at a time, with no re-layout of the dequantized tile. Checked under the
  interpreter only so far (its first GPU compile failed and was fixed after the session's GPU
  time ran out), so the tuner considers it only with ``QPIPE_MMP=1``.
* ``_mm_kernel`` (larger M): tensor cores. The dequantized weight tile [BLOCK_N, BLOCK_K] is
  the *left* operand, the activation tile the right one ("swap AB": acc = W x^T), so the
  small M lands on the MMA's narrow side and BLOCK_N >= 64 fills its wide side.

Split-K reduction happens inside the one launch: each split stores its fp32 partial in its
own workspace slot; the last program of an output tile (a ticket counter) adds the slots in
split order (deterministic: identical rows give identical bits), adds the bias, casts and
stores, and resets the counter. The counters are therefore all-zero between launches and no
memset kernel is needed, which matters at M=1 where a whole layer takes a few microseconds.
One workspace per device: do not run two of these kernels concurrently on different streams
of the same device.

A K tile never straddles a group (BLOCK_K divides the group size), so a tile has one scale and
one zero per output row and the kernels never gather them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from qpipe.kernels.interpreter import interpreting
from qpipe.kernels.layout import TILE_N, TILE_W
from qpipe.kernels.workspace import WORKSPACE

X_PRESCALE = tl.constexpr(1.0 / 64.0)  # |x/64 * (q - z)| * 4 terms < 65504 for any fp16 x
TILE_ROWS = tl.constexpr(TILE_N)
TILE_WORDS = tl.constexpr(TILE_W)


def _gemv_asm(rows: int) -> str:
    """PTX: one int32 word (8 columns) x `rows` activation rows -> `rows` fp32 partial dots.

    Operands: $0..$(rows-1) fp32 outputs; then the word; za = fp16x2 -(1024 + z);
    zb = fp16x2 -(64 + z); then 4 fp16x2 activation pairs (x0,x1)..(x6,x7) per row.
    Columns (2p, 2p+1) sit in nibbles (p, p + 4) (layout.py): masking 0x000F000F (or 0x00F000F0,
    giving 16 q) and OR-ing 0x6400 makes fp16 1024 + q (or 1024 + 16 q) in each half.
    """
    w, za, zb = f"${rows}", f"${rows + 1}", f"${rows + 2}"
    lines = [
        "{",
        ".reg .b32 t0, t1, t2, t3, w8, c16, a;",
        ".reg .b16 lo, hi;",
        ".reg .f32 flo, fhi;",
        "mov.b32 c16, 0x2c002c00;",  # fp16x2 (1/16, 1/16)
        f"lop3.b32 t0, {w}, 0x000f000f, 0x64006400, 0xea;",  # (a & b) | c
        f"lop3.b32 t1, {w}, 0x00f000f0, 0x64006400, 0xea;",
        f"shr.u32 w8, {w}, 8;",
        "lop3.b32 t2, w8, 0x000f000f, 0x64006400, 0xea;",
        "lop3.b32 t3, w8, 0x00f000f0, 0x64006400, 0xea;",
        f"add.rn.f16x2 t0, t0, {za};",  # (1024 + q) - (1024 + z): exact
        f"fma.rn.f16x2 t1, t1, c16, {zb};",  # (1024 + 16 q) / 16 - (64 + z): exact
        f"add.rn.f16x2 t2, t2, {za};",
        f"fma.rn.f16x2 t3, t3, c16, {zb};",
    ]
    return "\n".join(lines + gemv_rows_asm(rows) + ["}"])


def gemv_rows_asm(rows: int) -> list[str]:
    """The GEMV asm's last part, shared by the W4 and W8 kernels: the 8 dequantized columns
    (t0..t3, fp16x2) times each row's 4 activation pairs (operands from $(rows + 3) on),
    summed in one fp16x2 register, then in fp32 into output $r."""
    lines = []
    for r in range(rows):
        x = [f"${rows + 3 + 4 * r + i}" for i in range(4)]
        lines += [
            f"mul.rn.f16x2 a, t0, {x[0]};",
            f"fma.rn.f16x2 a, t1, {x[1]}, a;",
            f"fma.rn.f16x2 a, t2, {x[2]}, a;",
            f"fma.rn.f16x2 a, t3, {x[3]}, a;",
            "mov.b32 {lo, hi}, a;",
            "cvt.f32.f16 flo, lo;",
            "cvt.f32.f16 fhi, hi;",
            f"add.f32 ${r}, flo, fhi;",
        ]
    return lines


def _dequant_asm() -> str:
    """PTX: one int32 word -> its 8 columns as fp16 (q - z) * s, exactly the torch reference's
    fp16 weights ((q - z) is exact, the product rounds once). Operands: $0..$7 fp16 outputs
    (columns 0..7), $8 the word, $9 fp16x2 -(1024 + z), $10 fp16x2 -(64 + z), $11 fp16x2 s."""
    return "\n".join(
        [
            "{",
            ".reg .b32 t0, t1, t2, t3, w8, c16;",
            "mov.b32 c16, 0x2c002c00;",
            "lop3.b32 t0, $8, 0x000f000f, 0x64006400, 0xea;",
            "lop3.b32 t1, $8, 0x00f000f0, 0x64006400, 0xea;",
            "shr.u32 w8, $8, 8;",
            "lop3.b32 t2, w8, 0x000f000f, 0x64006400, 0xea;",
            "lop3.b32 t3, w8, 0x00f000f0, 0x64006400, 0xea;",
            "add.rn.f16x2 t0, t0, $9;",
            "fma.rn.f16x2 t1, t1, c16, $10;",
            "add.rn.f16x2 t2, t2, $9;",
            "fma.rn.f16x2 t3, t3, c16, $10;",
            "mul.rn.f16x2 t0, t0, $11;",
            "mul.rn.f16x2 t1, t1, $11;",
            "mul.rn.f16x2 t2, t2, $11;",
            "mul.rn.f16x2 t3, t3, $11;",
            "mov.b32 {$0, $1}, t0;",
            "mov.b32 {$2, $3}, t1;",
            "mov.b32 {$4, $5}, t2;",
            "mov.b32 {$6, $7}, t3;",
            "}",
        ]
    )


def _dequant_asm_bf16() -> str:
    """PTX: one int32 word -> its 8 columns as bf16 (q - z) * s, again exactly the torch
    reference's weights. bf16 has 7 mantissa bits, so every nibble is shifted down to bits
    0-3 before the OR with 0x4300 (bf16 128) makes 128 + q; ``fma`` with 1 subtracts
    128 + z exactly, ``fma`` with -0 is the one rounding multiply (sm_80's bf16x2 has fma
    only). Operands: $0..$7 bf16 outputs, $8 the word, $9 bf16x2 -(128 + z), $10 bf16x2 s."""
    lines = [
        "{",
        ".reg .b32 t0, t1, t2, t3, w4, w8, w12, one, nz;",
        "mov.b32 one, 0x3f803f80;",
        "mov.b32 nz, 0x80008000;",
        "shr.u32 w4, $8, 4;",
        "shr.u32 w8, $8, 8;",
        "shr.u32 w12, $8, 12;",
        "lop3.b32 t0, $8, 0x000f000f, 0x43004300, 0xea;",
        "lop3.b32 t1, w4, 0x000f000f, 0x43004300, 0xea;",
        "lop3.b32 t2, w8, 0x000f000f, 0x43004300, 0xea;",
        "lop3.b32 t3, w12, 0x000f000f, 0x43004300, 0xea;",
    ]
    lines += [f"fma.rn.bf16x2 t{i}, t{i}, one, $9;" for i in range(4)]
    lines += [f"fma.rn.bf16x2 t{i}, t{i}, $10, nz;" for i in range(4)]
    lines += [f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, t{i};" for i in range(4)]
    return "\n".join(lines + ["}"])


_DEQUANT_ASM = tl.constexpr(_dequant_asm())
_DEQUANT_ASM_BF16 = tl.constexpr(_dequant_asm_bf16())
_DEQUANT_CON_BF16 = tl.constexpr(",".join(["=h"] * 8 + ["r"] * 3))
_DEQUANT_CON = tl.constexpr(",".join(["=h"] * 8 + ["r"] * 4))
_GEMV_ASM_1 = tl.constexpr(_gemv_asm(1))
_GEMV_ASM_2 = tl.constexpr(_gemv_asm(2))
_GEMV_ASM_4 = tl.constexpr(_gemv_asm(4))
_GEMV_CON_1 = tl.constexpr(",".join(["=f"] * 1 + ["r"] * (3 + 4 * 1)))
_GEMV_CON_2 = tl.constexpr(",".join(["=f"] * 2 + ["r"] * (3 + 4 * 2)))
_GEMV_CON_4 = tl.constexpr(",".join(["=f"] * 4 + ["r"] * (3 + 4 * 4)))


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
    pid_k,
):
    """acc: fp32 [BLOCK_M, BLOCK_N] partial (SPLIT_K > 1) or full result for y[offs_m, offs_n].

    Split-K: each split stores its partial in its own workspace slot [pid_k, M, N]; the last
    split of a tile to finish (a ticket counter) adds the slots in split order. The order is
    fixed, so the result does not depend on which split finishes first: a row's output is the
    same bits whatever the other rows are and however often the call runs (atomic adds into
    one sum made identical rows of a batch differ in the last bit, and greedy decoding of
    real weights then parted rows at near-ties)."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        slot = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + slot, acc, mask=mask)
        # Every thread's stores must be issued before the ticket is taken (release below).
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for k in range(0, SPLIT_K):  # split order: deterministic
                # .cg: read at L2, where the other programs' stores are (not a stale L1 line)
                total += tl.load(
                    ws_ptr + k * M * N + slot, mask=mask, other=0.0, cache_modifier=".cg"
                )
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
def _gemv_program(
    N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BKW: tl.constexpr, SPLIT_K,
):  # fmt: skip
    """Where a GEMV program (W4, W8, FP8) works: its row block, output columns, words of a K
    tile and K tiles. The row block is the fastest grid axis: programs that read the same
    weight tile for different rows run side by side, so all but the first find it in L2."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kt0, kt1 = _k_range(K, pid_k, BLOCK_K, SPLIT_K)
    return pid_m, pid_n, pid_k, pid_m * BLOCK_M, offs_n, tl.arange(0, BKW), offs_n < N, kt0, kt1


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
    """int32 [R, W] -> fp32 [R, W, 8] holding 1 + q/16 for column 8w + c at [:, w, c].

    Column c of a word sits in nibble [0, 4, 1, 5, 2, 6, 3, 7][c] (layout.py). The 8 columns
    are joined into the new last axis (tl.join keeps it inside one thread), so no data moves
    between threads; tl.join appends its axis last, so the first join is the most significant
    of the three size-2 axes: column c = 4 * (first) + 2 * (second) + (third).
    """
    words = words.to(tl.uint32, bitcast=True)  # logical shifts
    c0, c1, c2, c3 = _nib(words, 0), _nib(words, 16), _nib(words, 4), _nib(words, 20)
    c4, c5, c6, c7 = _nib(words, 8), _nib(words, 24), _nib(words, 12), _nib(words, 28)
    even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
    odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    return tl.reshape(tl.join(even, odd), (words.shape[0], words.shape[1], 8))


@triton.jit
def _bf16x2(v):
    """fp32 [...] -> int32 [...] holding the bf16 value in both halves."""
    h = v.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _f16x2(v):
    """fp32 [...] -> int32 [...] holding the fp16 value in both halves."""
    h = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _x_tile_raw(x_ptr, row, stride_xm, M, kt, K, BLOCK_K: tl.constexpr):
    """Activation row ``row``, K tile ``kt`` as loaded, [BLOCK_K / 8, 8] (zeros past M or K).
    Not converted here: a prefetched value must not be touched before it is needed."""
    BKW: tl.constexpr = BLOCK_K // 8
    k_idx = kt * BLOCK_K + tl.arange(0, BKW)[:, None] * 8 + tl.arange(0, 8)[None, :]
    k_lim = K * (row < M).to(tl.int32)  # rows past M read nothing (kept tensor-only: the
    ptrs = x_ptr + row * stride_xm + k_idx  # interpreter rejects scalar-bool mask terms)
    return tl.load(ptrs, mask=k_idx < k_lim, other=0.0)


@triton.jit
def _x_tile(x_ptr, row, stride_xm, M, kt, K, BLOCK_K: tl.constexpr):
    """Activation row ``row``, K tile ``kt`` as fp32 [BLOCK_K / 8, 8] (zeros past M or K)."""
    return _x_tile_raw(x_ptr, row, stride_xm, M, kt, K, BLOCK_K).to(tl.float32)


@triton.jit
def _row_prescale(x_ptr, row, stride_xm, M, kt0, kt1, K, BLOCK_K: tl.constexpr):
    """The power of two 2**-e (e >= 6) that brings activation row ``row`` (over this program's
    K tiles) within |x| <= 1024, so the fp16x2 lane sums of 4 * 15 * |x| stay under 65504.
    fp16 activations never need more than the fixed 1/64; bf16 ones (range to 3e38) do."""
    BKW: tl.constexpr = BLOCK_K // 8
    amax = tl.zeros((BKW, 8), dtype=tl.float32)
    for kt in range(kt0, kt1):
        amax = tl.maximum(amax, tl.abs(_x_tile(x_ptr, row, stride_xm, M, kt, K, BLOCK_K)))
    top = tl.max(tl.max(amax, axis=1), axis=0)
    e = tl.maximum(tl.ceil(tl.log2(tl.maximum(top, 1.0) / 1024.0)), 6.0)
    return tl.exp2(-e)


@triton.jit
def _x_word_scaled(x):
    """fp32 [W, 8] -> (x * 2**-e_w, 2**e_w [W]), e_w the exponent of word w's largest |x|:
    each word's activations enter the fp16x2 dot within [-2, 2) at full fp16 precision,
    whatever their range (bf16) or smallness (fp16 below 2**-14 would lose bits), and no
    pass over x precedes the weights. Powers of two: exact both ways."""
    amax = tl.max(tl.abs(x), axis=1)
    e = tl.maximum(amax.to(tl.int32, bitcast=True) & 0x7F800000, 0x00800000)
    inv = (0x7F000000 - e).to(tl.float32, bitcast=True)
    return x * inv[:, None], e.to(tl.float32, bitcast=True)


@triton.jit
def _row_operands(x_raw, inv, s2, WORD_SCALE: tl.constexpr):
    """One activation row's K tile (as loaded) as the asm's four fp16x2 pair operands
    [1, W], and the factor [N, 1] or [N, W] that turns the fp32 partials into output units."""
    xt = x_raw.to(tl.float32)
    if WORD_SCALE:
        xt, up = _x_word_scaled(xt)
        factor = s2 * up[None, :]
    else:
        xt = xt * inv
        factor = s2 * (1.0 / inv)
    p0, p1, p2, p3 = _x_pairs(xt)
    return p0[None, :], p1[None, :], p2[None, :], p3[None, :], factor


@triton.jit
def _x_pairs(x):
    """fp32 [W, 8] (already scaled into fp16 range) -> four int32 [W]: fp16x2 pairs (x0,x1),
    (x2,x3), (x4,x5), (x6,x7) of each word's columns."""
    h = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    lo, hi = tl.split(tl.reshape(h, (h.shape[0], 4, 2)))  # even / odd columns
    pair = lo | (hi << 16)  # [W, 4]: pair p = (x_2p, x_2p+1)
    a, b = tl.split(tl.reshape(pair, (h.shape[0], 2, 2)))  # a: pairs 0, 2; b: pairs 1, 3
    p0, p2 = tl.split(a)
    p1, p3 = tl.split(b)
    return p0, p1, p2, p3


@triton.jit
def _dot_words_f32(words, x, zc):
    """Pure-Triton fallback: [R, W] words . x [W, 8] -> [R, W] exact-ish fp32 partials
    sum_c (q_c - z) x_c, via 16 * sum f x - (16 + z) * sum x with f = 1 + q/16."""
    f = _unpack_f(words)
    d = tl.sum(f * x[None, :, :], axis=2)
    return 16.0 * d - (16.0 + zc)[:, None] * tl.sum(x, axis=1)[None, :]


@triton.jit
def _w_rows(qw_ptr, offs_n, offs_w, KW, TILED: tl.constexpr):
    """Pointers to the words [offs_n, offs_w] of K tile 0. Row-major: row n at n * KW. Tiled
    (``layout.tile_w4``): 16-row x 16-word tiles of 1 KB, a row group's tiles one after another
    along K, so a program streams whole contiguous KBs instead of 64-byte pieces of 16 rows."""
    if TILED:
        rows = (offs_n // TILE_ROWS) * (TILE_ROWS * KW) + (offs_n % TILE_ROWS) * TILE_WORDS
    else:
        rows = offs_n * KW
    return qw_ptr + rows[:, None] + offs_w[None, :]


@triton.jit
def _w_step(BKW: tl.constexpr, TILED: tl.constexpr):
    """How far the word pointers move per K tile (tiled: BKW == TILE_WORDS, one whole tile)."""
    if TILED:
        return TILE_ROWS * BKW
    else:
        return BKW


@triton.jit
def _gemv_loads(w_ptrs, s_ptr, z_ptr, x_ptr, kt, kt1, w_end, offs_w, offs_n, n_ok, N, m0,
                stride_xm, M, K, GS: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr, TILED: tl.constexpr):  # fmt: skip
    """Everything K tile ``kt`` needs, issued but not waited for: the weight words, the group's
    scales and zero points, and the activation rows (raw). Past ``kt1`` everything is masked."""
    BKW: tl.constexpr = BLOCK_K // 8
    words = tl.load(
        w_ptrs + kt * _w_step(BKW, TILED),
        mask=n_ok[:, None] & ((kt * BKW + offs_w) < w_end)[None, :],
        other=0,
    )
    live = n_ok & ((offs_n * 0 + kt) < kt1)  # tensor-only mask terms (interpreter)
    g = (kt * BLOCK_K) // GS
    s = tl.load(s_ptr + g * N + offs_n, mask=live, other=0.0)
    z = s
    if HAS_Z:
        z = tl.load(z_ptr + g * N + offs_n, mask=live, other=0)
    x0 = _x_tile_raw(x_ptr, m0, stride_xm, M, kt, K, BLOCK_K)
    x1 = x0
    x2 = x0
    x3 = x0
    if BLOCK_M >= 2:
        x1 = _x_tile_raw(x_ptr, m0 + 1, stride_xm, M, kt, K, BLOCK_K)
    if BLOCK_M == 4:
        x2 = _x_tile_raw(x_ptr, m0 + 2, stride_xm, M, kt, K, BLOCK_K)
        x3 = _x_tile_raw(x_ptr, m0 + 3, stride_xm, M, kt, K, BLOCK_K)
    return words, s, z, x0, x1, x2, x3


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
    BLOCK_M: tl.constexpr,  # 1, 2 or 4 activation rows per program
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,  # runtime: one compiled kernel serves every split
    USE_ASM: tl.constexpr = True,
    DYN_SCALE: tl.constexpr = False,  # bf16 activations: per-row power-of-two pre-scale
    WORD_SCALE: tl.constexpr = False,  # per-word power-of-two scale instead (any dtype)
    PREFETCH: tl.constexpr = 2,  # tiles loaded ahead of the one computed: 2 or 3
    TILED: tl.constexpr = False,  # weight words in 1 KB tiles (layout.tile_w4)
):
    BKW: tl.constexpr = BLOCK_K // 8
    pid_m, pid_n, pid_k, m0, offs_n, offs_w, n_ok, kt0, kt1 = _gemv_program(
        N, K, BLOCK_M, BLOCK_N, BLOCK_K, BKW, SPLIT_K
    )
    w_ptrs = _w_rows(qw_ptr, offs_n, offs_w, KW, TILED)
    acc0 = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    z = tl.full((BLOCK_N,), 8.0, tl.float32)
    w_end = tl.minimum(KW, kt1 * BKW)  # words of this split: [kt0 * BKW, w_end)
    inv0 = X_PRESCALE
    inv1 = X_PRESCALE
    inv2 = X_PRESCALE
    inv3 = X_PRESCALE
    if USE_ASM and DYN_SCALE and not WORD_SCALE:
        inv0 = _row_prescale(x_ptr, m0, stride_xm, M, kt0, kt1, K, BLOCK_K)
        if BLOCK_M >= 2:
            inv1 = _row_prescale(x_ptr, m0 + 1, stride_xm, M, kt0, kt1, K, BLOCK_K)
        if BLOCK_M == 4:
            inv2 = _row_prescale(x_ptr, m0 + 2, stride_xm, M, kt0, kt1, K, BLOCK_K)
            inv3 = _row_prescale(x_ptr, m0 + 3, stride_xm, M, kt0, kt1, K, BLOCK_K)
    # Software prefetch, PREFETCH (2 or 3) tiles deep, of everything a tile reads (words,
    # scales, zero points, activations): with few warps per SM (the asm path is register
    # hungry) a load issued in the iteration that uses it would put its whole latency on the
    # critical path, and at M=1 the bytes in flight per SM are what bounds the bandwidth.
    w_1, s_1, z_1, xa_1, xb_1, xc_1, xd_1 = _gemv_loads(
        w_ptrs, s_ptr, z_ptr, x_ptr, kt0, kt1, w_end, offs_w, offs_n, n_ok, N, m0,
        stride_xm, M, K, GS, HAS_Z, BLOCK_M, BLOCK_K, TILED,
    )  # fmt: skip
    w_2, s_2, z_2, xa_2, xb_2, xc_2, xd_2 = _gemv_loads(
        w_ptrs, s_ptr, z_ptr, x_ptr, kt0 + 1, kt1, w_end, offs_w, offs_n, n_ok, N, m0,
        stride_xm, M, K, GS, HAS_Z, BLOCK_M, BLOCK_K, TILED,
    )  # fmt: skip
    if PREFETCH == 3:
        w_3, s_3, z_3, xa_3, xb_3, xc_3, xd_3 = _gemv_loads(
            w_ptrs, s_ptr, z_ptr, x_ptr, kt0 + 2, kt1, w_end, offs_w, offs_n, n_ok, N, m0,
            stride_xm, M, K, GS, HAS_Z, BLOCK_M, BLOCK_K, TILED,
        )  # fmt: skip
    for kt in range(kt0, kt1):
        words, s_raw, z_raw, xa, xb, xc, xd = w_1, s_1, z_1, xa_1, xb_1, xc_1, xd_1
        w_1, s_1, z_1, xa_1, xb_1, xc_1, xd_1 = w_2, s_2, z_2, xa_2, xb_2, xc_2, xd_2
        if PREFETCH == 3:
            w_2, s_2, z_2, xa_2, xb_2, xc_2, xd_2 = w_3, s_3, z_3, xa_3, xb_3, xc_3, xd_3
            w_3, s_3, z_3, xa_3, xb_3, xc_3, xd_3 = _gemv_loads(
                w_ptrs, s_ptr, z_ptr, x_ptr, kt + 3, kt1, w_end, offs_w, offs_n, n_ok, N, m0,
                stride_xm, M, K, GS, HAS_Z, BLOCK_M, BLOCK_K, TILED,
            )  # fmt: skip
        else:
            w_2, s_2, z_2, xa_2, xb_2, xc_2, xd_2 = _gemv_loads(
                w_ptrs, s_ptr, z_ptr, x_ptr, kt + 2, kt1, w_end, offs_w, offs_n, n_ok, N, m0,
                stride_xm, M, K, GS, HAS_Z, BLOCK_M, BLOCK_K, TILED,
            )  # fmt: skip
        s = s_raw.to(tl.float32)
        if HAS_Z:
            z = z_raw.to(tl.float32)
        if USE_ASM:
            za = _f16x2(-(1024.0 + z))[:, None]
            zb = _f16x2(-(64.0 + z))[:, None]
            s2 = s[:, None]
            a0, a1, a2, a3, f0 = _row_operands(xa, inv0, s2, WORD_SCALE)
            if BLOCK_M == 1:
                d0 = tl.inline_asm_elementwise(
                    _GEMV_ASM_1, _GEMV_CON_1, [words, za, zb, a0, a1, a2, a3],
                    dtype=tl.float32, is_pure=True, pack=1,
                )  # fmt: skip
                acc0 += d0 * f0
            elif BLOCK_M == 2:
                b0, b1, b2, b3, f1 = _row_operands(xb, inv1, s2, WORD_SCALE)
                d0, d1 = tl.inline_asm_elementwise(
                    _GEMV_ASM_2, _GEMV_CON_2,
                    [words, za, zb, a0, a1, a2, a3, b0, b1, b2, b3],
                    dtype=(tl.float32, tl.float32), is_pure=True, pack=1,
                )  # fmt: skip
                acc0 += d0 * f0
                acc1 += d1 * f1
            else:
                b0, b1, b2, b3, f1 = _row_operands(xb, inv1, s2, WORD_SCALE)
                c0, c1, c2, c3, f2 = _row_operands(xc, inv2, s2, WORD_SCALE)
                e0, e1, e2, e3, f3 = _row_operands(xd, inv3, s2, WORD_SCALE)
                d0, d1, d2, d3 = tl.inline_asm_elementwise(
                    _GEMV_ASM_4, _GEMV_CON_4,
                    [words, za, zb, a0, a1, a2, a3, b0, b1, b2, b3,
                     c0, c1, c2, c3, e0, e1, e2, e3],
                    dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1,
                )  # fmt: skip
                acc0 += d0 * f0
                acc1 += d1 * f1
                acc2 += d2 * f2
                acc3 += d3 * f3
        else:
            s2 = s[:, None]
            acc0 += _dot_words_f32(words, xa.to(tl.float32), z) * s2
            if BLOCK_M >= 2:
                acc1 += _dot_words_f32(words, xb.to(tl.float32), z) * s2
            if BLOCK_M == 4:
                acc2 += _dot_words_f32(words, xc.to(tl.float32), z) * s2
                acc3 += _dot_words_f32(words, xd.to(tl.float32), z) * s2
    # [BLOCK_M, BLOCK_N] from the per-row accumulators
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
    USE_ASM: tl.constexpr = False,
    TILED: tl.constexpr = False,
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
    w_ptrs = _w_rows(qw_ptr, offs_n, offs_w, KW, TILED)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in range(kt0, kt1):
        w_idx = kt * BKW + offs_w
        words = tl.load(
            w_ptrs + kt * _w_step(BKW, TILED),
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
        if USE_ASM:  # on the GPU: 16 (fp16) or 19 (bf16) PTX instructions per 8 weights
            if dt == tl.bfloat16:
                c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
                    _DEQUANT_ASM_BF16, _DEQUANT_CON_BF16,
                    [words, _bf16x2(-(128.0 + z))[:, None], _bf16x2(s)[:, None]],
                    dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1,
                )  # fmt: skip
            else:
                c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
                    _DEQUANT_ASM, _DEQUANT_CON,
                    [words, _f16x2(-(1024.0 + z))[:, None], _f16x2(-(64.0 + z))[:, None],
                     _f16x2(s)[:, None]],
                    dtype=(tl.float16,) * 8, is_pure=True, pack=1,
                )  # fmt: skip
            # same join tree as _unpack_f: column c = 4 * (first) + 2 * (second) + (third)
            even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
            odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
            w = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
        else:
            f = tl.reshape(_unpack_f(words), (BLOCK_N, BLOCK_K))
            # (q - z) * s in fp32 (16 f - 16 - z is exact), one rounding to the activation
            # dtype: the same weights as the torch reference
            w = ((16.0 * f - (16.0 + z)[:, None]) * s[:, None]).to(dt)
        # Triton's CPU interpreter mis-multiplies bf16 dots; fp32 is exact there
        if DOT_F32:  # noqa: SIM108
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
        else:
            acc = tl.dot(w, xt, acc)
    tile_id = pid_m * tl.num_programs(0) + pid_n
    _epilogue(
        tl.trans(acc), offs_m, offs_n, M, N, stride_ym, y_ptr, b_ptr, ws_ptr, cnt_ptr, tile_id,
        HAS_BIAS, SPLIT_K, pid_k,
    )  # fmt: skip


@triton.jit
def _mmp_kernel(
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
    SPLIT_K,
    DOT_F32: tl.constexpr = False,
    F16_BITS: tl.constexpr = False,
    TILED: tl.constexpr = False,
):
    """Tensor cores, one nibble plane at a time: nibble j of every word of a tile is the
    weight column 8w + c_j, so the tile's dot is the sum of 8 dots of the plane [BLOCK_N,
    BLOCK_K / 8] with the activation rows 8w + c_j (gathered from x, which sits in L1). No
    dequantized tile is ever re-laid out (``_mm_kernel`` joins and reshapes its 8 columns per
    word, a shuffle through shared memory), the MMA sees the exact integers q - z, and the group
    scale multiplies the fp32 partial once per tile. Needs BLOCK_K / 8 >= 16 (tl.dot)."""
    BKW: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BKW)
    m_ok = offs_m < M
    n_ok = offs_n < N
    dt = x_ptr.dtype.element_ty
    kt0, kt1 = _k_range(K, pid_k, BLOCK_K, SPLIT_K)
    w_ptrs = _w_rows(qw_ptr, offs_n, offs_w, KW, TILED)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in range(kt0, kt1):
        w_idx = kt * BKW + offs_w
        words = tl.load(
            w_ptrs + kt * _w_step(BKW, TILED),
            mask=n_ok[:, None] & (w_idx < KW)[None, :],
            other=0,
        )
        g = (kt * BLOCK_K) // GS
        s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 8.0, tl.float32)
        zh = (z + 1024.0).to(tl.float16)
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(8):
            c = (j % 4) * 2 + j // 4  # column of nibble j (layout.py); j is a constexpr
            k_idx = kt * BLOCK_K + offs_w * 8 + c
            xt = tl.load(
                x_ptr + offs_m[None, :] * stride_xm + k_idx[:, None],
                mask=m_ok[None, :] & (k_idx < K)[:, None],
                other=0.0,
            )  # [BKW, BLOCK_M]
            nib = (words >> (4 * j)) & 0xF
            if F16_BITS:  # fp16 1024 + q from the bits, minus 1024 + z: exact
                wj = (nib.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - zh[:, None]
                part = tl.dot(wj, xt, part)
            elif DOT_F32:  # the interpreter (it mis-multiplies bf16 dots)
                part = tl.dot(nib.to(tl.float32) - z[:, None], xt.to(tl.float32), part)
            else:
                part = tl.dot((nib.to(tl.float32) - z[:, None]).to(dt), xt, part)
        acc += part * s[:, None]
    tile_id = pid_m * tl.num_programs(0) + pid_n
    _epilogue(
        tl.trans(acc), offs_m, offs_n, M, N, stride_ym, y_ptr, b_ptr, ws_ptr, cnt_ptr, tile_id,
        HAS_BIAS, SPLIT_K, pid_k,
    )  # fmt: skip


# -- launch --------------------------------------------------------------------------------


# How the GEMV brings activations into fp16 range: "word" (a power of two per 8 columns, in
# the main loop) or "row" (fixed 1/64 for fp16; for bf16 a per-row power of two found by a
# pass over x before the weights). QPIPE_XSCALE overrides, for benchmarks.
XSCALE = os.environ.get("QPIPE_XSCALE", "word")


@functools.cache
def _has_bf16x2(device: torch.device) -> bool:
    """bf16x2 fma (the bf16 dequant asm) needs sm_80 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. kind "gemv" picks block_m from M itself (1, 2 or 4)."""

    kind: str
    block_n: int
    block_k: int
    split_k: int
    block_m: int = 1
    num_warps: int = 4
    num_stages: int = 2
    prefetch: int = 2  # gemv: tiles loaded ahead (2 or 3)

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


def weight_dims(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[int, int, bool]:
    """(N, words per row, tiled?) of a qweight: the tiled form (``layout.tile_w4``) has
    N / 16 rows of 16 rows' words, the row-major one N rows (the scales' N either way)."""
    n = scales.shape[1]
    if qweight.dim() != 2:
        raise ValueError(
            f"qweight {tuple(qweight.shape)} is in the fragment order: the "
            "fragment kernel reads it (frag_w4a16), not the Triton kernels"
        )
    if qweight.shape[0] == n:
        return n, qweight.shape[1], False
    if qweight.shape[0] * TILE_N != n or qweight.shape[1] % (TILE_N * TILE_W):
        raise ValueError(f"qweight {tuple(qweight.shape)} is neither [N, W] nor [N/16, 16 W] "
                         f"for N = {n}")  # fmt: skip
    return n, qweight.shape[1] // TILE_N, True


def _launch_plan(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    cfg: KernelConfig,
    y: torch.Tensor,
) -> tuple[triton.JITFunction, tuple[int, int, int], list, dict, dict]:
    """(kernel, grid, positional args, constexpr kwargs, launch options) of one call."""
    m, k = x.shape
    n, kw, tiled = weight_dims(qweight, scales)
    block_k = legal_block_k(group_size, cfg.block_k)
    if tiled and block_k != TILE_W * 8:
        raise ValueError(f"tiled weights need K tiles of {TILE_W * 8} columns, not {block_k}")
    n_tiles = triton.cdiv(n, cfg.block_n)
    if cfg.kind == "gemv":
        block_m = 1 if m == 1 else (2 if m == 2 else 4)
        grid = (triton.cdiv(m, block_m), n_tiles, cfg.split_k)
        kernel = _gemv_kernel
        word = XSCALE == "word"
        extra = {
            "USE_ASM": not interpreting(),
            "DYN_SCALE": x.dtype == torch.bfloat16 and not word,
            "WORD_SCALE": word,
            "PREFETCH": cfg.prefetch,
        }
    elif cfg.kind == "mmp":
        if block_k < 128:
            raise ValueError(f"the plane kernel needs K tiles of 128 (group size {group_size})")
        block_m = cfg.block_m
        grid = (n_tiles, cfg.split_k, triton.cdiv(m, block_m))
        kernel = _mmp_kernel
        interp = interpreting()
        extra = {"DOT_F32": interp, "F16_BITS": x.dtype == torch.float16 and not interp}
    else:
        block_m = cfg.block_m
        grid = (n_tiles, cfg.split_k, triton.cdiv(m, block_m))
        kernel = _mm_kernel
        interp = interpreting()
        asm = x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and _has_bf16x2(x.device))
        extra = {"DOT_F32": interp, "USE_ASM": not interp and asm}
    ws, cnt = WORKSPACE.for_launch(x.device, cfg.split_k, m, n, n_tiles * triton.cdiv(m, block_m))
    args = [
        x, qweight, scales, zeros if zeros is not None else scales,
        bias if bias is not None else scales, y, ws, cnt,
        m, n, k, kw, x.stride(0), y.stride(0),
    ]  # fmt: skip
    consts = dict(
        GS=group_size, HAS_Z=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT_K=cfg.split_k,
        TILED=tiled, **extra,
    )  # fmt: skip
    return kernel, grid, args, consts, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


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
    n, kw, _ = weight_dims(qweight, scales)
    if kw * 8 < k:
        raise ValueError(f"qweight holds {kw * 8} columns, x has {k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    kernel, grid, args, consts, options = _launch_plan(
        x, qweight, scales, zeros, group_size, bias, cfg, y
    )
    kernel[grid](*args, **consts, **options)
    return y


class DirectLauncher:
    """One layer's kernel at one M, called without Triton's Python launch path.

    ``kernel[grid](...)`` re-binds and re-specializes every argument on every call: about a
    hundred microseconds of host time on the lent GPU's CPU, several times the kernel itself
    at M=1, so an eager 4-bit decoder was slower than bf16. Here everything but the
    activation and output pointers is bound once; a call is an empty(), a stream query and
    the compiled kernel's C launcher. Valid while the inputs keep the specialization it was
    compiled for (contiguous, 16-byte aligned x), which ``__call__``'s caller checks.
    ``build`` returns None where this Triton's launcher does not take the call it expects
    (checked against a normal launch, to rounding: split-K adds in any order), and the
    normal path runs instead.
    """

    refused: str | None = None  # why the last ``build`` returned None (diagnostics)

    def __init__(self, compiled, grid, args: list, n: int) -> None:
        self._run = compiled.run
        self._function = compiled.function
        self._meta = compiled.packed_metadata
        self._grid = grid
        self._head = args[1:5]  # qweight, scales, zeros, bias
        self._tail = args[6:]  # workspace, tickets, sizes, strides, constexprs
        self._n = n

    @classmethod
    def build(
        cls,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        group_size: int,
        bias: torch.Tensor | None,
        cfg: KernelConfig,
    ) -> DirectLauncher | None:
        y = torch.empty(x.shape[0], scales.shape[1], dtype=x.dtype, device=x.device)
        kernel, grid, args, consts, options = _launch_plan(
            x, qweight, scales, zeros, group_size, bias, cfg, y
        )
        compiled = kernel[grid](*args, **consts, **options)
        try:
            from triton import knobs

            hooked = any(
                bool(h.calls) if hasattr(h, "calls") else h is not None  # HookChain or a hook
                for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
            )
        except (ImportError, AttributeError):  # a Triton before knobs: keep its own path
            cls.refused = "this Triton has no runtime knobs"
            return None
        if hooked:
            cls.refused = "a launch hook is set (a profiler wants to see every launch)"
            return None
        names = kernel.arg_names
        values = {**dict(zip(names, args, strict=False)), **consts}
        for p in kernel.params:  # defaults of constexprs not passed
            if p.name not in values:
                values[p.name] = p.default
        launcher = cls(compiled, grid, [values[name] for name in names], scales.shape[1])
        try:
            fast = launcher(x)
        except Exception as err:  # noqa: BLE001 (another Triton's launcher signature)
            cls.refused = f"launch failed: {err!r}"
            return None
        # split-K sums land in whatever order the atomics run: equal up to rounding, and a
        # launcher handed the wrong arguments would be far off
        err = float((fast.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30))
        if not err < 1e-3:
            cls.refused = f"direct launch differs from Triton's (relative error {err:.3g})"
            return None
        return launcher

    def takes(self, x: torch.Tensor) -> bool:
        """Whether ``x`` keeps the specialization the kernel was compiled for (contiguous,
        16-byte aligned: Triton specializes on both)."""
        return x.is_contiguous() and x.data_ptr() % 16 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: contiguous rows of K, any leading shape (the kernel was bound with their number)
        y = torch.empty(x.shape[:-1] + (self._n,), dtype=x.dtype, device=x.device)
        stream = torch._C._cuda_getCurrentRawStream(x.device.index)
        g0, g1, g2 = self._grid
        self._run(
            g0, g1, g2, stream, self._function, self._meta, None, None, None,
            x, *self._head, y, *self._tail,
        )  # fmt: skip
        return y
