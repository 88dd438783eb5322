"""The unpacked, exact exchange format for grouped integer weights, and RTN quantization.

Every converter (AutoGPTQ, AutoAWQ, compressed-tensors, RTN) produces an ``IntWeights``; the
kernel layout is built from it. Semantics follow compressed-tensors / llm-compressor in the
unsigned view: ``w[n, k] = (q[n, k] - z[n, g]) * s[n, g]`` with ``g = g_idx[k]`` (or
``k // group_size``), integers ``q`` in ``0 .. 2**bits - 1`` and the symmetric zero
``2**(bits - 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class IntWeights:
    """Grouped integer weights of a linear layer ``[N (out), K (in)]``, unpacked.

    q: uint8/int [N, K], values 0 .. 2**bits - 1.
    scales: float [N, G], G = ceil(K / group_size) (or max(g_idx) + 1).
    zeros: float/int [N, G] zero point in the integer domain; None means symmetric with
        zero 2**(bits - 1). May lie outside 0 .. 2**bits - 1 (AutoGPTQ v1 stores zero - 1, so
        a zero of 0 reads back as 16; we keep what the format says).
    group_size: columns per group (for g_idx=None: group of column k is k // group_size).
    g_idx: int32 [K] group of each input column (act-order checkpoints), or None.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    g_idx: torch.Tensor | None = None
    bits: int = 4

    def __post_init__(self) -> None:
        if self.q.dim() != 2:
            raise ValueError(f"q must be [N, K], got shape {tuple(self.q.shape)}")
        n, k = self.q.shape
        if self.scales.dim() != 2 or self.scales.shape[0] != n:
            raise ValueError(f"scales must be [N={n}, G], got {tuple(self.scales.shape)}")
        if self.zeros is not None and tuple(self.zeros.shape) != tuple(self.scales.shape):
            raise ValueError(
                f"zeros {tuple(self.zeros.shape)} must match scales {tuple(self.scales.shape)}"
            )
        if self.g_idx is not None and tuple(self.g_idx.shape) != (k,):
            raise ValueError(f"g_idx must be [K={k}], got {tuple(self.g_idx.shape)}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def group_index(self) -> torch.Tensor:
        """int64 [K]: the group of each input column."""
        if self.g_idx is not None:
            return self.g_idx.to(device=self.q.device, dtype=torch.long)
        return torch.arange(self.q.shape[1], device=self.q.device) // self.group_size

    def zeros_or_default(self) -> torch.Tensor:
        """The zero points as float32 [N, G], filling in the symmetric zero."""
        if self.zeros is None:
            return torch.full(
                self.scales.shape, float(2 ** (self.bits - 1)), device=self.scales.device
            )
        return self.zeros.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w[n, k] = (q[n, k] - z[n, g]) * s[n, g] computed in float32, then cast to dtype."""
        g = self.group_index()
        z = self.zeros_or_default()[:, g]
        s = self.scales.float()[:, g]
        return ((self.q.float() - z) * s).to(dtype)

    def to(self, device: torch.device | str) -> IntWeights:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return IntWeights(
            q=self.q.to(device),
            scales=self.scales.to(device),
            zeros=mv(self.zeros),
            group_size=self.group_size,
            g_idx=mv(self.g_idx),
            bits=self.bits,
        )


def num_groups(k: int, group_size: int) -> int:
    return math.ceil(k / group_size)


@torch.no_grad()
def quantize_rtn(
    weight: torch.Tensor,
    *,
    group_size: int,
    bits: int = 4,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> IntWeights:
    """Round-to-nearest grouped quantization with compressed-tensors' min/max rules.

    Symmetric: s = max|w| / ((2**bits - 1) / 2), zero 2**(bits-1). Asymmetric: the range always
    contains 0, s = (max - min) / (2**bits - 1), z = clamp(round(-min / s)). Scales are rounded
    to ``scale_dtype`` (default: the weight's dtype when it is fp16/bf16, else float32) before
    the weights are rounded, so that the stored scales are exactly the ones used.
    K need not be a multiple of group_size: the last group is shorter.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got {tuple(weight.shape)}")
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else None
        scale_dtype = scale_dtype or torch.float32
    n, k = weight.shape
    g = num_groups(k, group_size)
    w = weight.float()
    pad = g * group_size - k
    # Pad the last group with zeros: the range always contains 0, so padding changes nothing.
    wg = torch.nn.functional.pad(w, (0, pad)).view(n, g, group_size)
    qmax = 2**bits - 1
    lo = wg.amin(dim=2).clamp(max=0.0)
    hi = wg.amax(dim=2).clamp(min=0.0)
    eps = torch.finfo(scale_dtype).eps
    scales = torch.maximum(lo.abs(), hi) / (qmax / 2) if symmetric else (hi - lo) / qmax
    scales = torch.where(scales == 0, torch.full_like(scales, eps), scales)
    scales = scales.to(scale_dtype)
    s32 = scales.float()
    if symmetric:
        zeros = None
        z32 = torch.full_like(s32, float(2 ** (bits - 1)))
    else:
        z32 = torch.clamp(torch.round(-lo / s32), 0, qmax)
        zeros = z32.to(torch.uint8)
    q = torch.clamp(torch.round(wg / s32[..., None]) + z32[..., None], 0, qmax)
    q = q.view(n, g * group_size)[:, :k].to(torch.uint8)
    return IntWeights(q=q, scales=scales, zeros=zeros, group_size=group_size, bits=bits)


def w8_kernel_takes(k: int, group_size: int) -> bool:
    """Whether the W8A16 kernel takes a layer: groups of a multiple of 16 columns (a K tile
    then never straddles two), the last one possibly partial (SmolLM2's K = 576 at group 128).
    Here, not in ``triton_w8a16``: ``Int8Linear`` asks it on machines without Triton."""
    return group_size % 16 == 0 and k > 0
