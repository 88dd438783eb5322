"""Attention of a few new query positions against a long KV cache, split over the cache
("flash-decoding"), for grouped-query models without expanding the cache.

A decode step's attention reads the whole K and V cache of every layer for one query row per
head. SDPA parallelizes over (batch, heads, query blocks): with GQA folded into the query axis
that is batch x KV heads programs (8 for an 8B model), each streaming its whole cache alone;
unfolded, transformers first copies the cache to every query head. Here a program owns one
(batch, KV head, chunk of the cache) and all the query heads of its group, so the cache is read
once, by enough programs to fill the GPU; a second kernel merges the chunks' softmax partials.

Inputs as transformers hands them to an attention function: q [B, H, S, D] (any strides, last
dim contiguous), k and v [B, Hkv, L, D], an optional boolean mask [B or 1, 1, S, L] (True =
attend). Output [B, S, H, D] (transformers' attention output layout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qpipe.kernels.interpreter import interpreting


@triton.jit
def _partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    m_ptr,
    l_ptr,
    o_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_mb,
    stride_ms,
    stride_ml,
    HKV,
    S,
    L,
    chunk,
    scale,
    GROUPS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,  # query rows (GROUPS x S, padded to a power of two >= 16)
    BLOCK_L: tl.constexpr,
    D: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = bh // HKV
    hkv = bh % HKV
    rows = tl.arange(0, BLOCK_R)
    g = rows // S
    s = rows % S
    row_ok = rows < GROUPS * S
    offs_d = tl.arange(0, D)
    q_ptrs = (
        q_ptr + b * stride_qb + (hkv * GROUPS + g)[:, None] * stride_qh + s[:, None] * stride_qs
    )
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, D), tl.float32)
    l0 = split * chunk
    l1 = tl.minimum(l0 + chunk, L)
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    for start in range(l0, l1, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        allowed = row_ok[:, None] & (offs_l < l1)[None, :]
        if HAS_MASK:
            m_ptrs = mask_ptr + b * stride_mb + s[:, None] * stride_ms + offs_l[None, :] * stride_ml
            allowed = allowed & (tl.load(m_ptrs, mask=allowed, other=0) != 0)
        # A static cache is mostly future slots: a block nobody may attend to is not read.
        if tl.max(allowed.to(tl.int32)) > 0:
            l_ok = (offs_l < l1)[:, None]
            k = tl.load(
                k_base + offs_l[:, None] * stride_kl + offs_d[None, :], mask=l_ok, other=0.0
            )
            # V is issued with K: its latency hides behind the scores and the softmax
            v = tl.load(
                v_base + offs_l[:, None] * stride_vl + offs_d[None, :], mask=l_ok, other=0.0
            )
            if DOT_F32:  # the interpreter multiplies half-precision dots wrongly
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(allowed, scores * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DOT_F32:  # noqa: SIM108 (constexpr branches; keep them plain for Triton)
                pv = tl.dot(p, v.to(tl.float32))
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    ws = (bh * n_splits + split) * BLOCK_R + rows
    tl.store(m_ptr + ws, m_i)
    tl.store(l_ptr + ws, l_i)
    tl.store(o_ptr + ws[:, None] * D + offs_d[None, :], acc)


@triton.jit
def _merge_kernel(
    m_ptr,
    l_ptr,
    o_ptr,
    out_ptr,
    HKV,
    S,
    H,
    N_SPLITS,
    GROUPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    D: tl.constexpr,
):
    """One program per (batch, KV head, query row): its chunks' partials, all loaded at once,
    -> out [B, S, H, D]."""
    bh = tl.program_id(0)
    r = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    splits = tl.arange(0, BLOCK_SPLITS)
    ok = splits < N_SPLITS
    ws = (bh * N_SPLITS + splits) * BLOCK_R + r
    m = tl.load(m_ptr + ws, mask=ok, other=float("-inf"))
    sums = tl.load(l_ptr + ws, mask=ok, other=0.0)
    offs_d = tl.arange(0, D)
    o = tl.load(o_ptr + ws[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    top = tl.max(m, axis=0)
    w = tl.exp(m - tl.where(top == float("-inf"), 0.0, top))  # chunks with nothing: 0
    total = tl.sum(w * sums, axis=0)
    acc = tl.sum(o * w[:, None], axis=0)
    # a row that may attend to nothing (a padded query) comes out 0, not 0/0
    out = acc / tl.where(total > 0, total, 1.0)
    g = r // S
    s = r % S
    out_ptrs = out_ptr + ((b * S + s) * H + hkv * GROUPS + g) * D + offs_d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for every query head against its KV head: [B, S, H, D]."""
    b, h, s, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    groups = h // hkv
    block_r = max(16, triton.next_power_of_2(groups * s))
    block_l = 64 if d <= 128 else 32
    # enough chunks for about two programs per SM, each at least one block long
    want = max(1, -(-2 * _sms(query.device) // (b * hkv)))
    chunk = max(block_l, -(-triton.cdiv(length, want) // block_l) * block_l)
    n_splits = triton.cdiv(length, chunk)
    dev = query.device
    m_ws = torch.empty(b * hkv * n_splits * block_r, dtype=torch.float32, device=dev)
    l_ws = torch.empty_like(m_ws)
    o_ws = torch.empty(b * hkv * n_splits * block_r * d, dtype=torch.float32, device=dev)
    out = torch.empty(b, s, h, d, dtype=query.dtype, device=dev)
    if mask is not None:
        mask_u8 = mask.view(torch.uint8)
        stride_mb = 0 if mask.shape[0] == 1 else mask_u8.stride(0)
        stride_ms = 0 if mask.shape[2] == 1 else mask_u8.stride(2)
        strides_m = (stride_mb, stride_ms, mask_u8.stride(3))
    else:
        mask_u8, strides_m = query, (0, 0, 0)
    if key.stride(3) != 1 or value.stride(3) != 1 or query.stride(3) != 1:
        raise ValueError("decode_attention needs the head dimension contiguous")
    interp = interpreting()
    _partial_kernel[(b * hkv, n_splits)](
        query, key, value, mask_u8, m_ws, l_ws, o_ws,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        *strides_m,
        hkv, s, length, chunk, scale,
        GROUPS=groups, HAS_MASK=mask is not None, BLOCK_R=block_r, BLOCK_L=block_l, D=d,
        DOT_F32=interp, num_warps=4, num_stages=2,
    )  # fmt: skip
    _merge_kernel[(b * hkv, groups * s)](
        m_ws, l_ws, o_ws, out, hkv, s, h, n_splits,
        GROUPS=groups, BLOCK_R=block_r, BLOCK_SPLITS=max(2, triton.next_power_of_2(n_splits)),
        D=d, num_warps=4,
    )  # fmt: skip
    return out
