"""Exact converters from checkpoint formats to ``IntWeights`` (unpacked integers).

AutoGPTQ (``gptq`` = v1, ``gptq_v2``):
    qweight int32 [K * bits / 32, N]: packed along K, value of column k of output n at bits
        ``bits * (k % (32 // bits))`` of ``qweight[k // (32 // bits), n]``.
    qzeros  int32 [G, N * bits / 32]: packed along N the same way.
    scales  fp16  [G, N];  g_idx int32 [K] (group of each column; act-order when not k // gs).
    v1 stores ``(zero - 1) & mask`` and its kernels add the one back on read, so a stored 15
    means a zero of 16 (the historic off-by-one); v2 stores the zero itself.
AutoAWQ GEMM: qweight int32 [K, N / 8], qzeros int32 [G, N / 8], scales fp16 [G, N]; packed along
    N, nibble i of a word holds column ``8 * word + [0, 2, 4, 6, 1, 3, 5, 7][i]``; zeros stored
    as is.
compressed-tensors ``pack-quantized``: weight_packed int32 [N, ceil(K * bits / 32)], a dense bit
    stream along K (element i at bit ``i * bits``) of ``q_signed + 2**(bits - 1)``, i.e. the
    unsigned view; weight_zero_point (asymmetric) packed the same way along N:
    [ceil(N * bits / 32), G]; weight_scale [N, G]; weight_shape [N, K]; weight_g_idx [K].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from qpipe.kernels.intweights import IntWeights
from qpipe.kernels.layout import CHUNK_ELEMENTS

# An extractor takes (module name, its tensors by suffix, the empty module) and gives the exact
# integer weights; a checkpoint loader calls it once per quantized module.
Extractor = Callable[[str, dict[str, torch.Tensor], torch.nn.Module], IntWeights]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i]


def _unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack int32 words holding 32 // bits values each (lowest bits first) along ``dim``."""
    if 32 % bits:
        raise ValueError(f"{bits}-bit values do not tile an int32 word evenly")
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    w = words.to(torch.int32).movedim(dim, -1)
    # Arithmetic shift of negative int32 words smears the sign bit: the mask drops it.
    vals = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    vals = vals.reshape(*w.shape[:-1], w.shape[-1] * per)
    return vals.movedim(-1, dim)


def _unpack_dense(
    words: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """compressed-tensors' dense bit stream along the last dim: element i at bit i * bits,
    values may straddle two words (bits that do not divide 32). Rows go in chunks: the int64
    temporaries of a whole lm_head (150k x 4k) would take gigabytes."""
    rows = words.reshape(-1, words.shape[-1])
    out = torch.empty(rows.shape[0], count, dtype=dtype, device=words.device)
    pos = torch.arange(count, device=words.device, dtype=torch.int64) * bits
    idx, off = pos // 32, pos % 32
    step = max(1, CHUNK_ELEMENTS // max(count, 1))
    for i in range(0, rows.shape[0], step):
        w = rows[i : i + step].to(torch.int64) & 0xFFFFFFFF
        w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # a word past the end
        pair = w[..., idx] | (w[..., idx + 1] << 32)
        out[i : i + step] = (pair >> off) & ((1 << bits) - 1)
    return out.reshape(*words.shape[:-1], count)


def infer_group_size(k: int, num_groups: int) -> int:
    """The group size that splits K columns into ``num_groups`` groups (last may be short)."""
    if num_groups == 1:
        return k
    if k % num_groups == 0:
        return k // num_groups
    fits = [1 << p for p in range(3, 14) if math.ceil(k / (1 << p)) == num_groups]
    if len(fits) != 1:
        raise ValueError(f"cannot infer the group size of K={k} with {num_groups} groups")
    return fits[0]


def _normalize_g_idx(g_idx: torch.Tensor | None, k: int, group_size: int) -> torch.Tensor | None:
    """None for the trivial mapping k // group_size (so kernels take the fast path)."""
    if g_idx is None:
        return None
    g = g_idx.to(torch.int32).flatten()
    if g.numel() != k:
        raise ValueError(f"g_idx has {g.numel()} entries, expected K={k}")
    if bool((g < 0).all()):  # compressed-tensors initialises an unused g_idx to -1
        return None
    trivial = torch.arange(k, device=g.device, dtype=torch.int32) // group_size
    return None if torch.equal(g, trivial) else g


def _group_size_of(g_idx: torch.Tensor) -> int:
    """The nominal group size of an act-order g_idx: the largest group's population."""
    return int(torch.bincount(g_idx.long()).max())


def from_autogptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int = 4,
    sym: bool = True,
    zeros_minus_one: bool = True,
    group_size: int | None = None,
) -> IntWeights:
    """AutoGPTQ/GPTQModel tensors -> IntWeights (exact). See the module docstring for layout.

    ``zeros_minus_one``: the zero points are stored one less than they are (AutoGPTQ's v1
    ``checkpoint_format``); False for GPTQModel's v2, which stores them as they are.
    ``sym``: the checkpoint's ``sym`` flag; its zeros must then all read back as the midpoint
    (a mismatch means the wrong format was named) and are returned as None.
    ``group_size``: optional; inferred from scales (and g_idx) when not given.
    """
    q = _unpack_words(qweight, bits, dim=0).t()  # [N, K]
    n, k = q.shape
    sc = scales.t().contiguous()  # [N, G]
    if sc.shape[0] != n:
        raise ValueError(f"scales {tuple(scales.shape)} do not match qweight's N={n}")
    if qzeros is None:
        if not sym:
            raise ValueError("asymmetric GPTQ weights need qzeros")
        zeros = None
    else:
        z = _unpack_words(qzeros, bits, dim=1)[:, :n].t()  # [N, G]
        if zeros_minus_one:
            z = z + 1
        mid = 2 ** (bits - 1)
        if sym:
            if not bool((z == mid).all()):
                raise ValueError(
                    f"sym=True but qzeros do not decode to {mid} with "
                    f"zeros_minus_one={zeros_minus_one} (the checkpoint_format)"
                )
            zeros = None
        else:
            zeros = z.to(torch.uint8)
    if g_idx is not None and group_size is None:
        group_size = _group_size_of(g_idx.to(torch.int64))
    if group_size is None:
        group_size = infer_group_size(k, sc.shape[1])
    gi = _normalize_g_idx(g_idx, k, group_size)
    return IntWeights(
        q=q.to(torch.uint8).contiguous(),
        scales=sc,
        zeros=zeros,
        group_size=group_size,
        g_idx=gi,
        bits=bits,
    )


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 in AWQ order -> [R, 8C] values in natural column order."""
    raw = _unpack_words(words, 4, dim=1)  # column 8c + i holds logical column 8c + ORDER[i]
    r, c8 = raw.shape
    out = torch.empty_like(raw)
    order = torch.tensor(AWQ_ORDER, device=words.device)
    dest = (torch.arange(c8, device=words.device) // 8) * 8 + order.repeat(c8 // 8)
    out[:, dest] = raw
    return out


def from_autoawq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, group_size: int
) -> IntWeights:
    """AutoAWQ GEMM tensors -> IntWeights (exact, 4-bit, asymmetric)."""
    q = _awq_unpack(qweight).t()  # [N, K]
    z = _awq_unpack(qzeros).t()  # [N, G]
    n, k = q.shape
    sc = scales.t().contiguous()
    if sc.shape != z.shape or sc.shape[0] != n:
        raise ValueError(
            f"AWQ shapes disagree: qweight -> {tuple(q.shape)}, qzeros -> {tuple(z.shape)}, "
            f"scales -> {tuple(sc.shape)}"
        )
    return IntWeights(
        q=q.to(torch.uint8).contiguous(),
        scales=sc,
        zeros=z.to(torch.uint8).contiguous(),
        group_size=group_size,
        bits=4,
    )


def from_compressed_tensors(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None = None,
    weight_g_idx: torch.Tensor | None = None,
    *,
    weight_shape: torch.Tensor | Sequence[int],
    group_size: int,
    bits: int = 4,
    symmetric: bool = True,
) -> IntWeights:
    """compressed-tensors ``pack-quantized`` tensors -> IntWeights (exact).

    ``weight_zero_point`` may be packed int32 [ceil(N * bits / 32), G] (as saved) or unpacked
    signed [N, G] (as held in memory before compression).
    """
    shape = [
        int(v) for v in (weight_shape.tolist() if torch.is_tensor(weight_shape) else weight_shape)
    ]
    n, k = shape
    if weight_packed.dtype != torch.int32:
        raise ValueError(f"weight_packed must be int32, got {weight_packed.dtype}")
    # stored = signed + offset = unsigned view
    q = _unpack_dense(weight_packed, bits, k, torch.uint8)
    sc = weight_scale.reshape(n, -1)
    offset = 2 ** (bits - 1)
    zeros = None
    if weight_zero_point is not None:
        zp = weight_zero_point
        packed_rows = math.ceil(n * bits / 32)
        if zp.dtype == torch.int32 and zp.shape[0] == packed_rows and zp.shape[0] != n:
            z = _unpack_dense(zp.t(), bits, n).t()  # packed along N: stored = signed + offset
        else:
            z = zp.reshape(n, -1).to(torch.int64) + offset  # unpacked signed zero points
        if symmetric:
            if not bool((z == offset).all()):
                raise ValueError("symmetric=True but weight_zero_point is not all zero")
        else:
            zeros = z.to(torch.uint8)
    elif not symmetric:
        raise ValueError("asymmetric compressed-tensors weights need weight_zero_point")
    if group_size <= 0:  # channel-wise: one group spanning K
        group_size = k
    gi = _normalize_g_idx(weight_g_idx, k, group_size)
    return IntWeights(
        q=q.to(torch.uint8).contiguous(),
        scales=sc,
        zeros=zeros,
        group_size=group_size,
        g_idx=gi,
        bits=bits,
    )
