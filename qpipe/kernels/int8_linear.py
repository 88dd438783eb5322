"""``Int8Linear``: a Linear whose weight is held as grouped 8-bit integers (the 8-bit layers of
a ``quant=auto`` plan). The forward is the torch reference: dequantize, then one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qpipe.kernels.intweights import IntWeights


class Int8Linear(torch.nn.Module):
    """y = x @ W.T + b, ``W[n, k] = (q[n, k] - z[n, g]) * s[n, g]`` with ``q`` uint8 [N, K],
    ``s`` [N, G] in the run's dtype, ``z`` uint8 [N, G] (None: symmetric, zero 128), and
    ``g = g_idx[k]`` (act-order) or ``k // group_size``."""

    def __init__(self, iw: IntWeights, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        if iw.bits != 8:
            raise ValueError(f"Int8Linear holds 8-bit weights, got {iw.bits}-bit")
        self.out_features, self.in_features = iw.shape
        self.group_size = iw.group_size
        self.register_buffer("qweight", iw.q.to(torch.uint8).contiguous())
        self.register_buffer("scales", iw.scales.to(dtype).contiguous())
        self.register_buffer("zeros", None if iw.zeros is None else iw.zeros.to(torch.uint8))
        gi = None if iw.g_idx is None else iw.g_idx.to(torch.int32)
        self.register_buffer("g_idx", gi)
        self.bias = (
            None if bias is None else torch.nn.Parameter(bias.to(dtype), requires_grad=False)
        )

    def int_weights(self) -> IntWeights:
        return IntWeights(
            q=self.qweight,
            scales=self.scales,
            zeros=self.zeros,
            group_size=self.group_size,
            g_idx=self.g_idx,
            bits=8,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out_features, in_features] in ``dtype``."""
        n, k = self.qweight.shape
        gs = self.group_size
        if self.g_idx is not None or k % gs:
            return self.int_weights().dequantize(dtype)
        # Whole groups in column order: broadcast per group instead of gathering per column.
        q = self.qweight.view(n, k // gs, gs).to(dtype)
        s = self.scales.to(dtype).unsqueeze(-1)
        z = 128.0 if self.zeros is None else self.zeros.to(dtype).unsqueeze(-1)
        return ((q - z) * s).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Half-precision matmul on CPU is slow and not always implemented: compute in fp32.
        compute = torch.float32 if x.device.type == "cpu" else x.dtype
        w = self.dequantize(compute)
        b = None if self.bias is None else self.bias.to(compute)
        return F.linear(x.to(compute), w, b).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=8, "
            f"group_size={self.group_size}, symmetric={self.zeros is None}"
        )
