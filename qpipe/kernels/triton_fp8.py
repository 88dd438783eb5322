"""Triton FP8 weight-only GEMV for decode: y[M, N] = x[M, K] @ (W8[N, K] * s[N]).T (+ b), M <= 4.

W8 float8_e4m3fn (one byte a weight, as ``Fp8Linear`` holds it), s fp32 per output channel,
x fp16 or bf16. At decode a step is bound by the weight stream: W8A8 through
``torch._scaled_mm`` pays a per-token activation quantization and a tensor-core tile sized
for many rows, so it barely beats bf16 at M = 1. This kernel streams the e4m3 bytes (half of
bf16's) and dequantizes them in registers on the CUDA cores, like the W8A16 GEMV it is
modelled on (``triton_w8a16._w8_gemv_kernel``): a program owns BLOCK_N output rows, up to 4
activation rows and a slice of K (split-K), loads the weights as int32 words (16-byte loads)
and issues the next tile's loads before it computes the current one.

Dequantizing without FP8 hardware: an e4m3 byte ``s eeee mmm`` (bias 7) moved into fp16's
bit positions, ``s`` to bit 15 and ``eeee mmm`` to bits 13..7 (fp16: bias 15), is the fp16
number ``e4m3 / 256``: exponent and mantissa keep their meaning with a bias 8 larger, and the
e4m3 subnormals (eeee = 0) land on fp16 subnormals with the same factor. Exact for every
finite e4m3 value (the weights are finite: quantization clamps them to ±448), and only
integer bit operations, so it runs on any GPU Triton compiles for (sm_80 has no e4m3
conversion instruction and Triton refuses ``float8e4nv`` there) and in Triton's CPU
interpreter, which therefore runs the very formulation the GPU does. The fp16 weight goes to
fp32 (exact) and meets the activation (fp32, exact from fp16 or bf16) in one fp32 FMA:
products are exact up to fp32's own rounding, the sum is fp32; ``256 * s`` multiplies each
row's sum once, at the end.

Split-K partials meet through the W4/W8 kernels' deterministic epilogue and workspace
(``triton_w4a16._epilogue``, ``workspace.WORKSPACE``): no memset, no host sync, capturable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from qpipe.kernels.interpreter import interpreting
from qpipe.kernels.triton_w4a16 import _epilogue, _gemv_program
from qpipe.kernels.workspace import WORKSPACE

GEMV_MAX_M = 4  # activation rows a program takes (1, 2 or 4)
FP8_TO_FP16_SCALE = 256.0  # the bit move reads e4m3 / 2**8: each row's sum is multiplied back


def _dequant_asm() -> str:
    """PTX: one int32 word (4 e4m3 bytes) -> its 4 weights / 256 as fp32 ($0..$3, bytes 0..3;
    $4 the word). The bytes at bits 8..15 and 24..31 of a register become an fp16x2 pair in
    one AND-shift-OR (sign kept at bit 15, ``eeee mmm`` shifted to bits 13..7); shifting the
    word left by 8 first brings bytes 0 and 2 there. ``cvt.f32.f16`` is exact."""
    return "\n".join(
        [
            "{",
            ".reg .b32 q8, t1, t2, p1, p2;",
            ".reg .b16 l1, h1, l2, h2;",
            "shl.b32 q8, $4, 8;",
            "and.b32 t1, $4, 0x7F007F00;",
            "and.b32 t2, q8, 0x7F007F00;",
            "shr.b32 t1, t1, 1;",
            "shr.b32 t2, t2, 1;",
            "lop3.b32 p1, $4, 0x80008000, t1, 0xEA;",  # (a & b) | c: bytes 1, 3
            "lop3.b32 p2, q8, 0x80008000, t2, 0xEA;",  # bytes 0, 2
            "mov.b32 {l2, h2}, p2;",
            "mov.b32 {l1, h1}, p1;",
            "cvt.f32.f16 $0, l2;",
            "cvt.f32.f16 $1, l1;",
            "cvt.f32.f16 $2, h2;",
            "cvt.f32.f16 $3, h1;",
            "}",
        ]
    )


_DEQUANT_ASM = tl.constexpr(_dequant_asm())
_DEQUANT_CON = tl.constexpr("=f,=f,=f,=f,r")


@triton.jit
def _fp8_byte(words, BYTE: tl.constexpr):
    """Byte ``BYTE`` of each int32 word, an e4m3 code, as its exact value / 256 in fp32 (the
    interpreter's form of ``_DEQUANT_ASM``, and its specification)."""
    b = (words >> (8 * BYTE)) & 0xFF
    bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)  # fp16 bits: sign, then eeee mmm
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _x_cols(x_ptr, row, stride_xm, M, kt, K, BLOCK_K: tl.constexpr):
    """Activation row ``row``'s K tile ``kt`` in fp32 as the four columns of each weight word,
    [1, BLOCK_K / 4] each (zeros past M or K)."""
    BKW: tl.constexpr = BLOCK_K // 4
    k_idx = kt * BLOCK_K + tl.arange(0, BKW)[:, None] * 4 + tl.arange(0, 4)[None, :]
    k_lim = K * (row < M).to(tl.int32)  # tensor-only mask terms (the interpreter)
    x = tl.load(x_ptr + row * stride_xm + k_idx, mask=k_idx < k_lim, other=0.0).to(tl.float32)
    a, b = tl.split(tl.reshape(x, (BKW, 2, 2)))  # a: columns 0, 2; b: columns 1, 3
    c0, c2 = tl.split(a)
    c1, c3 = tl.split(b)
    return c0[None, :], c1[None, :], c2[None, :], c3[None, :]


@triton.jit
def _dot_word(acc, w0, w1, w2, w3, x_ptr, row, stride_xm, M, kt, K, BLOCK_K: tl.constexpr):
    """acc [BLOCK_N, BLOCK_K / 4] += each word's 4 weights times row ``row``'s 4 columns."""
    c0, c1, c2, c3 = _x_cols(x_ptr, row, stride_xm, M, kt, K, BLOCK_K)
    acc += w0 * c0
    acc += w1 * c1
    acc += w2 * c2
    acc += w3 * c3
    return acc


@triton.jit
def _load_words(w_ptrs, kt, kt1, KW, offs_w, n_ok, BLOCK_K: tl.constexpr):
    """Tile ``kt``'s weight words [BLOCK_N, BLOCK_K / 4], issued but not waited for (zeros
    past ``kt1``, the end of this program's split, and past K)."""
    BKW: tl.constexpr = BLOCK_K // 4
    live = (offs_w * 0 + kt) < kt1  # tensor-only mask terms (the interpreter)
    ok = n_ok[:, None] & ((kt * BKW + offs_w) < KW)[None, :] & live[None, :]
    return tl.load(w_ptrs + kt * BKW, mask=ok, other=0)


@triton.jit
def _e4m3_gemv_kernel(
    x_ptr,
    q_ptr,  # the e4m3 weights viewed as int32 [N, K / 4]
    s_ptr,  # fp32 [N]
    b_ptr,
    y_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 1, 2 or 4 activation rows per program
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,
    USE_ASM: tl.constexpr = True,  # the PTX dequantization (False: the interpreter's bit ops)
):
    BKW: tl.constexpr = BLOCK_K // 4
    pid_m, pid_n, pid_k, m0, offs_n, offs_w, n_ok, kt0, kt1 = _gemv_program(
        N, K, BLOCK_M, BLOCK_N, BLOCK_K, BKW, SPLIT_K
    )
    KW = K // 4
    w_ptrs = q_ptr + offs_n[:, None] * KW + offs_w[None, :]
    acc0 = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BKW), dtype=tl.float32)
    # one tile ahead: the weight loads of tile kt + 1 are in flight while tile kt is computed
    words_next = _load_words(w_ptrs, kt0, kt1, KW, offs_w, n_ok, BLOCK_K)
    for kt in range(kt0, kt1):
        words = words_next
        words_next = _load_words(w_ptrs, kt + 1, kt1, KW, offs_w, n_ok, BLOCK_K)
        # dequantized once, shared by every activation row of the program
        if USE_ASM:
            w0, w1, w2, w3 = tl.inline_asm_elementwise(
                _DEQUANT_ASM, _DEQUANT_CON, [words],
                dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1,
            )  # fmt: skip
        else:
            w0 = _fp8_byte(words, 0)
            w1 = _fp8_byte(words, 1)
            w2 = _fp8_byte(words, 2)
            w3 = _fp8_byte(words, 3)
        acc0 = _dot_word(acc0, w0, w1, w2, w3, x_ptr, m0, stride_xm, M, kt, K, BLOCK_K)
        if BLOCK_M >= 2:
            acc1 = _dot_word(acc1, w0, w1, w2, w3, x_ptr, m0 + 1, stride_xm, M, kt, K, BLOCK_K)
        if BLOCK_M == 4:
            acc2 = _dot_word(acc2, w0, w1, w2, w3, x_ptr, m0 + 2, stride_xm, M, kt, K, BLOCK_K)
            acc3 = _dot_word(acc3, w0, w1, w2, w3, x_ptr, m0 + 3, stride_xm, M, kt, K, BLOCK_K)
    # the channel scale (and the 2**8 the bit move left out) once per output, in fp32
    s = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0) * 256.0
    if BLOCK_M == 1:
        out = (tl.sum(acc0, axis=1) * s)[None, :]
    elif BLOCK_M == 2:
        out = tl.trans(tl.join(tl.sum(acc0, axis=1) * s, tl.sum(acc1, axis=1) * s))
    else:
        r02 = tl.join(tl.sum(acc0, axis=1) * s, tl.sum(acc2, axis=1) * s)
        r13 = tl.join(tl.sum(acc1, axis=1) * s, tl.sum(acc3, axis=1) * s)
        out = tl.trans(tl.reshape(tl.join(r02, r13), (BLOCK_N, 4)))
    offs_m = m0 + tl.arange(0, BLOCK_M)
    tile_id = pid_m * tl.num_programs(1) + pid_n
    _epilogue(
        out, offs_m, offs_n, M, N, stride_ym, y_ptr, b_ptr, ws_ptr, cnt_ptr, tile_id,
        HAS_BIAS, SPLIT_K, pid_k,
    )  # fmt: skip


@dataclass(frozen=True)
class Fp8GemvConfig:
    """One FP8 GEMV launch (the rows per program follow M: 1, 2 or 4)."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    kind: str = "e4m3_gemv"  # tells a stored tuning choice from the W4/W8 configurations

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def gemv_takes(m: int, k: int) -> bool:
    """Whether the GEMV takes the call: at most 4 rows, whole 4-byte words per weight row."""
    return 1 <= m <= GEMV_MAX_M and k % 4 == 0


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(tiles: int, k_tiles: int, sms: int, waves: float) -> int:
    """The smallest power-of-two split giving about ``waves`` programs per SM (at least two
    K tiles per split)."""
    split = 1
    while tiles * split < waves * sms and split * 2 <= max(1, k_tiles // 2):
        split *= 2
    return split


def _rows(m: int) -> int:
    """Activation rows a program holds: 1, 2 or 4."""
    return 1 if m == 1 else (2 if m == 2 else 4)


def heuristic(m: int, n: int, k: int, device: torch.device) -> Fp8GemvConfig:
    """128-byte K tiles; 64 rows a program up to M = 2 (the activations' per-tile work shared
    by more rows, as in the W8 GEMV), 32 at 3-4 rows, where four fp32 accumulators per weight
    word would take ~250 registers at 64 (sm_90: 130 at 32, a thread's 32 bytes a tile); the
    split that gives every SM about four programs."""
    bn, bk = (64 if _rows(m) <= 2 else 32), 128
    split = _split(-(-n // bn) * -(-m // GEMV_MAX_M), -(-k // bk), _num_sms(device), 4)
    return Fp8GemvConfig(bn, bk, split)


# (rows a program, warps): a thread holds rows x BLOCK_K / (32 x warps) weight bytes a tile
_TILES = ((16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 8))


def candidates(m: int, n: int, k: int, device: torch.device) -> list[Fp8GemvConfig]:
    """The tuner's search space: tile heights x warps x K tiles where a thread's bytes per tile
    times the activation rows stay within 128 (past it the accumulators spill on sm_90), x the
    splits that give between one and sixteen programs per SM (the heuristic's first: the
    tuner checks every candidate against the first one's output)."""
    sms = _num_sms(device)
    out = [heuristic(m, n, k, device)]
    for bk in (128, 256):
        k_tiles = -(-k // bk)
        for bn, warps in _TILES:
            if bn * bk // (32 * warps) * _rows(m) > 128:
                continue
            tiles = -(-n // bn) * -(-m // GEMV_MAX_M)
            ok = [s for s in (1, 2, 4, 8, 16, 32) if s <= k_tiles and sms <= tiles * s <= 16 * sms]
            for split in ok or [_split(tiles, k_tiles, sms, 4)]:
                cfg = Fp8GemvConfig(bn, bk, split, warps)
                if cfg not in out:
                    out.append(cfg)
    return out


def e4m3_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    cfg: Fp8GemvConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[M, N] = x[M, K] @ (weight * scale[:, None]).T (+ bias), in x's dtype: x fp16, bf16
    or fp32 (M <= 4), weight float8_e4m3fn [N, K] (K % 4 == 0), scale fp32 [N]."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.dtype != torch.float8_e4m3fn or weight.shape[1] != k or scale.numel() != n:
        raise ValueError(
            f"e4m3_gemv: x is {tuple(x.shape)}, weight {tuple(weight.shape)} {weight.dtype}, "
            f"scale {tuple(scale.shape)}: want e4m3 [N, K] and N scales"
        )
    if not gemv_takes(m, k) or not weight.is_contiguous() or weight.data_ptr() % 4:
        raise ValueError(f"the FP8 GEMV takes 1..{GEMV_MAX_M} rows and K % 4 == 0, got {m} x {k}")
    cfg = cfg or heuristic(m, n, k, x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if tuple(y.shape) != (m, n) or y.stride(1) != 1:
        raise ValueError(f"e4m3_gemv: out is {tuple(y.shape)}, the product is {(m, n)}")
    block_m = _rows(m)
    n_tiles = triton.cdiv(n, cfg.block_n)
    m_tiles = triton.cdiv(m, block_m)
    ws, cnt = WORKSPACE.for_launch(x.device, cfg.split_k, m, n, n_tiles * m_tiles)
    _e4m3_gemv_kernel[(m_tiles, n_tiles, cfg.split_k)](
        x, weight.view(torch.int32), scale, bias if bias is not None else scale, y, ws, cnt,
        m, n, k, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, USE_ASM=not interpreting(), num_warps=cfg.num_warps, num_stages=1,
    )  # fmt: skip
    return y
