"""Reference packers for checkpoint formats, written from each format's definition.

They are deliberately plain (Python loops over bit positions, numpy uint32 arithmetic) and share
no code with ``qpipe.kernels.formats``, so converter tests are not circular. Other tests use them
to write AutoGPTQ / AutoAWQ / compressed-tensors tensors for loader tests.

Inputs everywhere are *unsigned* integer weights: ``q_int`` [N, K] in 0..2**bits-1, zero points
``zeros_int`` [N, G] in the integer domain, ``scales`` [N, G]; dequantized weight
``(q - z[:, g]) * s[:, g]`` with ``g = g_idx[k]`` (default ``k // group_size``).
"""

from __future__ import annotations

import numpy as np
import torch

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def _np_u32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.int64).numpy().astype(np.uint32)


def _to_int32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32).copy())


def _pack_rows_along_dim0(vals: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight packing: rows i*per .. i*per+per-1 -> row i, value j at bits*j."""
    per = 32 // bits
    rows, cols = vals.shape
    out = np.zeros(((rows + per - 1) // per, cols), dtype=np.uint32)
    for r in range(rows):
        out[r // per] |= (vals[r] & ((1 << bits) - 1)) << np.uint32(bits * (r % per))
    return out


def _pack_cols(vals: np.ndarray, bits: int, order: list[int] | None = None) -> np.ndarray:
    """Pack along columns: value of column c*per + order[i] goes to bits*i of word c."""
    per = 32 // bits
    order = order or list(range(per))
    rows, cols = vals.shape
    words = (cols + per - 1) // per
    padded = np.zeros((rows, words * per), dtype=np.uint32)
    padded[:, :cols] = vals
    out = np.zeros((rows, words), dtype=np.uint32)
    for c in range(words):
        for i in range(per):
            out[:, c] |= (padded[:, c * per + order[i]] & ((1 << bits) - 1)) << np.uint32(bits * i)
    return out


def pack_autogptq(
    q_int: torch.Tensor,
    zeros_int: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    sym: bool,
    *,
    bits: int = 4,
    group_size: int | None = None,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """AutoGPTQ tensors: qweight int32 [K*bits/32, N], qzeros int32 [G, N*bits/32],
    scales fp16 [G, N], g_idx int32 [K].

    v1 ("gptq") stores ``(zero - 1)`` in each field (masked to its bits, as GPTQModel does;
    AutoGPTQ's own packer let a negative value spill into the neighbours). v2 stores the zero.
    sym=True writes the midpoint zero 2**(bits-1) whatever ``zeros_int`` holds.
    Without g_idx, AutoGPTQ still saves the trivial ``k // group_size``; ``group_size``
    defaults to K / G.
    """
    n, k = q_int.shape
    g = scales.shape[1]
    if sym or zeros_int is None:
        zeros_int = torch.full((n, g), 2 ** (bits - 1), dtype=torch.int64)
    stored = zeros_int.to(torch.int64) - (1 if checkpoint_format == "gptq" else 0)
    z = _np_u32(stored)  # a negative v1 value wraps; _pack_cols masks it to its field
    qweight = _pack_rows_along_dim0(_np_u32(q_int).T.copy(), bits)  # [K/per, N]
    qzeros = _pack_cols(z.T.copy(), bits)  # [G, N/per]
    if g_idx is None:
        gs = group_size or k // g
        g_idx = torch.arange(k, dtype=torch.int32) // gs
    return {
        "qweight": _to_int32(qweight),
        "qzeros": _to_int32(qzeros),
        "scales": scales.t().contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def pack_autoawq(
    q_int: torch.Tensor, zeros_int: torch.Tensor, scales: torch.Tensor
) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors: qweight int32 [K, N/8] (packed along N in the order
    [0, 2, 4, 6, 1, 3, 5, 7]), qzeros int32 [G, N/8] (same), scales fp16 [G, N]."""
    qweight = _pack_cols(_np_u32(q_int).T.copy(), 4, AWQ_ORDER_MAP)
    qzeros = _pack_cols(_np_u32(zeros_int).T.copy(), 4, AWQ_ORDER_MAP)
    return {
        "qweight": _to_int32(qweight),
        "qzeros": _to_int32(qzeros),
        "scales": scales.t().contiguous().to(torch.float16),
    }


def _dense_bitstream(vals: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors' pack_to_int32 along the last dim: element i occupies global bits
    [i*bits, (i+1)*bits) of the row's little-endian bit stream, cut into int32 words."""
    rows, cols = vals.shape
    words = -(-cols * bits // 32)
    out = np.zeros((rows, words), dtype=np.uint64)
    for i in range(cols):
        v = vals[:, i].astype(np.uint64) & np.uint64((1 << bits) - 1)
        for b in range(bits):
            pos = i * bits + b
            out[:, pos // 32] |= ((v >> np.uint64(b)) & np.uint64(1)) << np.uint64(pos % 32)
    return out.astype(np.uint32)


def pack_compressed_tensors(
    q_int: torch.Tensor,
    zeros_int: torch.Tensor | None,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int = 4,
    symmetric: bool = True,
) -> dict[str, torch.Tensor]:
    """compressed-tensors ``pack-quantized``: weight_packed int32 [N, ceil(K*bits/32)] holding
    ``q_signed + 2**(bits-1)`` (= the unsigned value), weight_scale [N, G],
    weight_zero_point (asymmetric only) int32 [ceil(N*bits/32), G] packed along N the same way
    from the signed zero point, weight_g_idx [K] when given, weight_shape [N, K]."""
    n, k = q_int.shape
    # The signed value is q - offset and the packer adds the offset back: the unsigned value.
    out = {
        "weight_packed": _to_int32(_dense_bitstream(_np_u32(q_int), bits)),
        "weight_scale": scales.clone(),
        "weight_shape": torch.tensor([n, k]),
    }
    if not symmetric:
        assert zeros_int is not None
        packed = _dense_bitstream(_np_u32(zeros_int).T.copy(), bits)  # along N
        out["weight_zero_point"] = _to_int32(packed.T.copy())
    if g_idx is not None:
        out["weight_g_idx"] = g_idx.to(torch.int32)
    return out
