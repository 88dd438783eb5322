"""``IntLinear``: a drop-in ``nn.Linear`` holding grouped integer weights of any width 1..8 bits
(2-, 3- and 8-bit GPTQ/RTN checkpoints), for the torch reference path.

The weights stay packed as compressed-tensors does it (a dense bit stream along K, element i at
bit ``i * bits``), so the memory it holds is what the width promises; each forward unpacks and
dequantizes the whole weight, then calls ``F.linear``. qpipe's Triton kernels are 4-bit only:
4-bit checkpoints run on ``QuantLinear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qpipe.kernels.formats import _unpack_dense
from qpipe.kernels.intweights import IntWeights

KERNEL = "torch"


def pack_dense(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers [N, K] (0 .. 2**bits - 1) into int32 [N, ceil(K * bits / 32)], element
    i at bit ``i * bits`` (a value may straddle two words): compressed-tensors' packing."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is not in 1..8")
    n, k = q.shape
    words = math.ceil(k * bits / 32)
    pos = torch.arange(k, device=q.device, dtype=torch.int64) * bits
    idx, off = pos // 32, pos % 32
    vals = (q.to(torch.int64) & ((1 << bits) - 1)) << off  # < 2**39: fits int64
    acc = torch.zeros(n, words + 1, dtype=torch.int64, device=q.device)
    # Fields do not overlap, so adding is the same as or-ing them in.
    acc.index_add_(1, idx, vals & 0xFFFFFFFF)
    acc.index_add_(1, idx + 1, vals >> 32)
    acc = acc[:, :words]
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


class IntLinear(torch.nn.Module):
    """y = x @ W.T + b with W held as packed ``bits``-bit integers, per-group scales and
    (asymmetric schemes) uint8 zero points; ``g_idx`` for act-order checkpoints."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        act_order: bool = False,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        words = math.ceil(in_features * bits / 32)
        g = math.ceil(in_features / group_size)
        self.register_buffer(
            "qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(out_features, g, dtype=dtype, device=device))
        self.register_buffer(
            "zeros",
            None if symmetric else torch.zeros(out_features, g, dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "g_idx",
            torch.zeros(in_features, dtype=torch.int32, device=device) if act_order else None,
        )
        if bias:
            self.bias = torch.nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @property
    def kernel(self) -> str:
        return KERNEL

    @classmethod
    def from_int(
        cls,
        w: IntWeights,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        in_features: int | None = None,
    ) -> IntLinear:
        n, k = w.shape
        if in_features is not None and in_features != k:
            raise ValueError(f"IntLinear does not pad K: weights have K={k}, model {in_features}")
        mod = cls(
            k,
            n,
            bits=w.bits,
            group_size=w.group_size,
            symmetric=w.zeros is None,
            act_order=w.g_idx is not None,
            bias=bias is not None,
            dtype=dtype,
            device=w.q.device,
        )
        mod.qweight.copy_(pack_dense(w.q, w.bits))
        mod.scales.copy_(w.scales.to(dtype))
        if w.zeros is not None:
            if bool((w.zeros < 0).any()) or bool((w.zeros > 255).any()):
                raise ValueError("zero points outside 0..255 do not fit IntLinear's uint8 zeros")
            mod.zeros.copy_(w.zeros.to(torch.uint8))
        if w.g_idx is not None:
            mod.g_idx.copy_(w.g_idx.to(torch.int32))
        if bias is not None:
            mod.bias.data.copy_(bias.to(dtype))
        return mod

    def _unpack(self) -> torch.Tensor:
        """[N, K] integers. Widths that divide 32 (2, 4, 8) never straddle a word: one shift
        per field; others (3) take the general bit-stream path."""
        if 32 % self.bits:
            return _unpack_dense(self.qweight, self.bits, self.in_features)
        shifts = torch.arange(0, 32, self.bits, device=self.qweight.device, dtype=torch.int32)
        fields = (self.qweight.unsqueeze(-1) >> shifts) & ((1 << self.bits) - 1)
        return fields.reshape(self.out_features, -1)[:, : self.in_features]

    def int_weights(self) -> IntWeights:
        return IntWeights(
            q=self._unpack(),
            scales=self.scales,
            zeros=self.zeros,
            group_size=self.group_size,
            g_idx=self.g_idx,
            bits=self.bits,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out_features, in_features]."""
        return self.int_weights().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Half-precision matmul on CPU is slow and not always implemented: compute in fp32.
        compute = torch.float32 if x.device.type == "cpu" else x.dtype
        b = None if self.bias is None else self.bias.to(compute)
        return F.linear(x.to(compute), self.dequantize(compute), b).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}, "
            f"act_order={self.g_idx is not None}, kernel={KERNEL}"
        )
