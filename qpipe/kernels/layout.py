"""qpipe's own packed int4 layout ("qpipe-w4", version 3), as qpipe's kernels read it.

All tensors live in *kernel order* of the input columns: for act-order checkpoints the columns
are sorted by group once at load time (``perm``) and the activation is permuted the same way at
run time, so every group is a contiguous run of ``group_size`` columns and the kernels never
gather scales.

qweight  int32 [N, ceil(K / 8)]   row n, word w holds columns 8w .. 8w + 7 of output n; column
                                  8w + c sits in nibble NIBBLE_OF_COL[c] = [0,4,1,5,2,6,3,7][c]
                                  (bits 4i .. 4i + 3 of nibble i). Equivalently nibble i holds
                                  column [0,2,4,6,1,3,5,7][i], AutoAWQ's interleave: one AND-OR
                                  with 0x000F000F / 0x00F000F0 then drops the columns (2p, 2p+1)
                                  into the two halves of one register as fp16 bits (the 0x6400
                                  magic-number dequant, two weights per instruction). Rows are
                                  contiguous along K: a thread reads 16 bytes = 32 weights of one
                                  output with one 128-bit load; a tail word is zero-padded.
                                  Held tiled (version 2, ``tile_w4``) where N % 16 == 0, K % 128
                                  == 0 and the group size is a multiple of 128: int32 [N / 16,
                                  16 W], 1 KB tiles of 16 rows x 16 words, a row group's tiles
                                  one after another along K, so a kernel program's K tile is one
                                  contiguous KB instead of 16 strided 64-byte pieces (H200, M=1,
                                  28672 x 8192: 49.4 -> 39.8 us). Version 1 (row-major always)
                                  checkpoints are tiled at load, exactly.
                                  Version 3 holds the same shapes in the tensor-core fragment
                                  order (``frag_w4``, int32 [N / 16, K / 64, 128]) that the
                                  fragment kernel (``w4_frag.cu``) reads; older checkpoints are
                                  converted at load, exactly, and a device without that kernel
                                  converts them to the tiled form for the Triton kernels.
scales   fp16/bf16 [G, N]         per group, contiguous along N (one coalesced vector per group).
zeros    uint8 [G, N] or absent   integer zero points (asymmetric); absent => 2**(bits - 1).
                                  uint8 keeps AutoGPTQ v1's zero of 16 exact.
perm     int32 [K] or absent      kernel column c is original column perm[c] (act-order only).

Dequantized weight in kernel order: ``w[n, c] = (q[n, c] - z[c // gs, n]) * s[c // gs, n]``;
in original order ``W[:, perm[c]] = w[:, c]``, so ``x @ W.T == x[..., perm] @ w.T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpipe.kernels.intweights import IntWeights, num_groups

LAYOUT_NAME = "qpipe-w4"
LAYOUT_VERSION = 3  # 3: fragment order (frag_w4); 2: tiled (tile_w4); 1: always row-major
PACK = 8  # int4 values per int32 word
# Elements converted per step when packing or unpacking: bounds the int64 temporaries (8 bytes
# each) to ~128 MB however large the matrix.
CHUNK_ELEMENTS = 1 << 24
NIBBLE_OF_COL = (0, 4, 1, 5, 2, 6, 3, 7)  # column 8w + c of a word lives in this nibble
# The kernels' tiled order (``tile_w4``): 16 rows x 16 words (128 columns), 1 KB per tile.
TILE_N = 16
TILE_W = 16
# The fragment order (``frag_w4``): per 16-row tile, chunks of 64 columns, 128 words a chunk
# (32 lanes x 4 words, one 16-byte load per lane of a warp).
FRAG_K = 64
FRAG_WORDS = 128
FORMS = ("rows", "tiled", "frag")


@dataclass
class PackedW4:
    """The kernel layout of one linear layer (see the module docstring); qweight in any of
    its forms (rows, tiled, frag: ``form_of``)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    group_size: int
    k: int  # columns held (kernel order); the layer's in_features may be smaller (pad mode)

    @property
    def n(self) -> int:
        return self.scales.shape[1]


def _col_shifts(device: torch.device) -> torch.Tensor:
    return torch.tensor(NIBBLE_OF_COL, device=device, dtype=torch.int64) * 4


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> int32 [N, ceil(K/8)] (column order inside a word above)."""
    n, k = q.shape
    words = -(-k // PACK)
    shifts = _col_shifts(q.device)
    out = torch.empty(n, words, dtype=torch.int32, device=q.device)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))  # bounds the int64 temporaries
    for i in range(0, n, step):
        rows = q[i : i + step].to(torch.int64)
        qp = torch.nn.functional.pad(rows, (0, words * PACK - k)).view(-1, words, PACK)
        packed = (qp << shifts).sum(dim=-1)  # disjoint bit fields: the sum is an OR
        # Reinterpret as signed int32 (values >= 2**31 wrap) without overflow errors.
        out[i : i + step] = packed - ((packed >> 31) << 32)
    return out


def unpack_int4_rows(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [N, W] -> uint8 [N, k]."""
    shifts = _col_shifts(qweight.device).to(torch.int32)
    q = (qweight.unsqueeze(-1) >> shifts) & 0xF
    return q.reshape(qweight.shape[0], -1)[:, :k].to(torch.uint8)


def can_tile(n: int, words: int, group_size: int) -> bool:
    """Whether an [n, words] qweight has the tiled form: whole tiles, and K tiles of 128
    columns that never straddle a group (group size a multiple of 128)."""
    return n % TILE_N == 0 and words % TILE_W == 0 and group_size % (TILE_W * PACK) == 0


def tile_w4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, W] row-major -> int32 [N / 16, 16 W]: row g holds rows 16g .. 16g + 15 as
    W / 16 tiles of [16 rows, 16 words], one after another along K. A permutation of the words
    (exact); the kernels tell the two forms apart by shape (rows != the scales' N)."""
    n, w = qweight.shape
    t = qweight.reshape(n // TILE_N, TILE_N, w // TILE_W, TILE_W).permute(0, 2, 1, 3)
    return t.reshape(n // TILE_N, TILE_N * w)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> uint8 [..., 8]: nibble i (bits 4i .. 4i + 3) of each word at [..., i]."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """``_nibbles``' inverse: uint8 [..., 8] -> int32 [...]."""
    shifts = torch.arange(0, 32, 4, device=nibbles.device, dtype=torch.int64)
    packed = (nibbles.to(torch.int64) << shifts).sum(dim=-1)  # disjoint fields: an OR
    return (packed - ((packed >> 31) << 32)).to(torch.int32)


# frag_w4's order as a permutation of q [N, K] viewed as (row tile, h, g, chunk, t, kk, jh, jl):
# row = 16 tile + 8 h + g, column = 64 chunk + 16 t + 4 kk + 2 jh + jl. A chunk's 128 words are
# lane (4 g + t) x kk, and nibble i = 4 jl + 2 jh + h of a word: w4_frag.cu's fragments.
_FRAG_AXES = (0, 3, 2, 4, 5, 7, 6, 1)
_ROWS_AXES = (0, 7, 2, 1, 3, 4, 6, 5)  # its inverse


def frag_w4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N, W] row-major -> int32 [N / 16, K / 64, 128], K = 8 W, in the order the
    fragment kernel's lanes consume it (``w4_frag.cu``). Exact (a permutation of nibbles);
    needs N % 16 == 0 and K % 64 == 0 (``can_tile``'s shapes always qualify)."""
    n, w = qweight.shape
    k = w * PACK
    if n % TILE_N or k % FRAG_K:
        raise ValueError(f"frag_w4 needs N % 16 == 0 and K % 64 == 0, got {n} x {k}")
    out = torch.empty(n // TILE_N, k // FRAG_K, FRAG_WORDS, dtype=torch.int32,
                      device=qweight.device)  # fmt: skip
    step = max(1, CHUNK_ELEMENTS // (TILE_N * k))  # row tiles per step: bounded temporaries
    for t0 in range(0, n // TILE_N, step):
        rows = qweight[t0 * TILE_N : (t0 + step) * TILE_N]
        q = unpack_int4_rows(rows, k).view(-1, 2, 8, k // FRAG_K, 4, 4, 2, 2)
        nib = q.permute(*_FRAG_AXES).reshape(-1, k // FRAG_K, FRAG_WORDS, PACK)
        out[t0 : t0 + step] = _words(nib)
    return out


def unfrag_w4(frag: torch.Tensor) -> torch.Tensor:
    """``frag_w4``'s inverse: int32 [N / 16, K / 64, 128] -> [N, K / 8] row-major."""
    tiles, chunks, _ = frag.shape
    k = chunks * FRAG_K
    out = torch.empty(tiles * TILE_N, k // PACK, dtype=torch.int32, device=frag.device)
    step = max(1, CHUNK_ELEMENTS // (TILE_N * k))
    for t0 in range(0, tiles, step):
        nib = _nibbles(frag[t0 : t0 + step]).view(-1, chunks, 8, 4, 4, 2, 2, 2)
        q = nib.permute(*_ROWS_AXES).reshape(-1, k)
        out[t0 * TILE_N : (t0 + step) * TILE_N] = pack_int4_rows(q)
    return out


def unpack_q(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """uint8 [N, k] integers of a qweight in any form (no repacking on the way)."""
    form = form_of(qweight, n)
    if form == "frag":
        tiles, chunks, _ = qweight.shape
        q = _nibbles(qweight).view(tiles, chunks, 8, 4, 4, 2, 2, 2).permute(*_ROWS_AXES)
        return q.reshape(n, chunks * FRAG_K)[:, :k]
    return unpack_int4_rows(untile_w4(qweight) if form == "tiled" else qweight, k)


def form_of(qweight: torch.Tensor, n: int) -> str:
    """Which form a qweight of an N-output layer is in: "rows" [N, W], "tiled" [N / 16, 16 W]
    or "frag" [N / 16, K / 64, 128] (told apart by shape, as checkpoints of every version are)."""
    if qweight.dim() == 3:
        return "frag"
    return "rows" if qweight.shape[0] == n else "tiled"


def to_rows(qweight: torch.Tensor, n: int) -> torch.Tensor:
    """Any form -> row-major [N, W] (the tensor itself when it already is)."""
    form = form_of(qweight, n)
    if form == "frag":
        return unfrag_w4(qweight)
    return untile_w4(qweight) if form == "tiled" else qweight


def to_form(qweight: torch.Tensor, n: int, form: str) -> torch.Tensor:
    """Any form -> ``form`` (exact; the tensor itself when it already is in it)."""
    if form not in FORMS:
        raise ValueError(f"unknown qweight form {form!r}; choose one of {', '.join(FORMS)}")
    if form_of(qweight, n) == form:
        return qweight
    rows = to_rows(qweight, n)
    if form == "frag":
        return frag_w4(rows)
    return tile_w4(rows) if form == "tiled" else rows


def untile_w4(tiled: torch.Tensor) -> torch.Tensor:
    """``tile_w4``'s inverse: int32 [N / 16, 16 W] -> [N, W]."""
    groups, flat = tiled.shape
    w = flat // TILE_N
    t = tiled.reshape(groups, w // TILE_W, TILE_N, TILE_W).permute(0, 2, 1, 3)
    return t.reshape(groups * TILE_N, w)


def act_order_perm(g_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    """Stable sort of the columns by group; checks that each group is then one contiguous
    run of ``group_size`` columns (true for GPTQ act-order, where groups are filled in
    quantization order), which is what the kernels assume."""
    perm = torch.sort(g_idx.to(torch.int64), stable=True).indices
    sorted_groups = g_idx.to(torch.int64)[perm]
    expect = torch.arange(g_idx.numel(), device=g_idx.device) // group_size
    if not torch.equal(sorted_groups, expect):
        raise ValueError(
            "g_idx does not split into contiguous groups of group_size columns once sorted; "
            "this act-order layout is not supported"
        )
    return perm.to(torch.int32)


def pack_w4(w: IntWeights, dtype: torch.dtype = torch.float16) -> PackedW4:
    """IntWeights -> the kernel layout. Exact: scales are cast to ``dtype`` (the activation
    dtype), which is the only rounding, and the torch reference path uses the same scales."""
    if w.bits != 4:
        raise ValueError(f"the qpipe-w4 layout holds 4-bit weights, got bits={w.bits}")
    n, k = w.shape
    g = num_groups(k, w.group_size)
    q, scales, zeros = w.q, w.scales, w.zeros
    perm = None
    if w.g_idx is not None:
        perm = act_order_perm(w.g_idx, w.group_size)
        q = q[:, perm.long()]
    if scales.shape[1] != g:
        raise ValueError(f"expected {g} groups for K={k}, gs={w.group_size}; got {scales.shape[1]}")
    z = None
    if zeros is not None:
        zf = zeros.float()
        if bool(((zf < 0) | (zf > 255) | (zf != zf.round())).any()):
            raise ValueError("zero points must be integers in 0..255 for the qpipe-w4 layout")
        z = zf.to(torch.uint8).t().contiguous()
    if bool((q > 15).any()):
        raise ValueError("q values must lie in 0..15")
    return PackedW4(
        qweight=pack_int4_rows(q).contiguous(),
        scales=scales.t().to(dtype).contiguous(),
        zeros=z,
        perm=perm,
        group_size=w.group_size,
        k=k,
    )


def dequantize_kernel_order(p: PackedW4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] dequantized weights in kernel column order, computed in float32."""
    q = unpack_q(p.qweight, p.n, p.k).float()
    grp = torch.arange(p.k, device=q.device) // p.group_size
    s = p.scales.float().t()[:, grp]
    if p.zeros is None:
        return ((q - 8.0) * s).to(dtype)
    z = p.zeros.float().t()[:, grp]
    return ((q - z) * s).to(dtype)


def unpack_w4(p: PackedW4) -> IntWeights:
    """The kernel layout back to IntWeights in original column order (exact)."""
    q = unpack_q(p.qweight, p.n, p.k)
    g_idx = None
    if p.perm is not None:
        inv = torch.empty_like(p.perm, dtype=torch.long)
        inv[p.perm.long()] = torch.arange(p.k, device=p.perm.device)
        q = q[:, inv]
        g_idx = torch.empty(p.k, dtype=torch.int32, device=q.device)
        g_idx[p.perm.long()] = (torch.arange(p.k, device=q.device) // p.group_size).to(torch.int32)
    return IntWeights(
        q=q,
        scales=p.scales.t().contiguous(),
        zeros=None if p.zeros is None else p.zeros.t().contiguous(),
        group_size=p.group_size,
        g_idx=g_idx,
        bits=4,
    )
