"""``Int8Linear``: a Linear whose weight is held as grouped 8-bit integers (the 8-bit layers of
a ``quant=auto`` plan, and ``quant.bits=8`` on the GPU). ``kernel="triton"`` runs qpipe's W8A16
kernel (``triton_w8a16.py``: the weight streamed once at 1 byte per weight); ``"torch"`` is the
reference, which dequantizes the whole weight each call, then one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qpipe.kernels import ops  # noqa: F401  (registers torch.ops.qpipe.w8a16_linear)
from qpipe.kernels.interpreter import interpreting
from qpipe.kernels.intweights import IntWeights, w8_kernel_takes


class Int8Linear(torch.nn.Module):
    """y = x @ W.T + b, ``W[n, k] = (q[n, k] - z[n, g]) * s[n, g]`` with ``q`` uint8 [N, K],
    ``s`` [N, G] in the run's dtype, ``z`` uint8 [N, G] (None: symmetric, zero 128), and
    ``g = g_idx[k]`` (act-order) or ``k // group_size``."""

    def __init__(
        self,
        iw: IntWeights,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        kernel: str = "triton",
    ) -> None:
        super().__init__()
        if iw.bits != 8:
            raise ValueError(f"Int8Linear holds 8-bit weights, got {iw.bits}-bit")
        if kernel not in ("triton", "torch"):
            raise ValueError(f"Int8Linear kernel={kernel!r}: triton or torch")
        # act-order (a gathered group per column) and ragged groups stay on the reference
        exact_groups = iw.g_idx is None and w8_kernel_takes(iw.shape[1], iw.group_size)
        self.kernel = kernel if exact_groups else "torch"
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
        if self.kernel == "triton" and (x.is_cuda or interpreting()):
            flat = x.reshape(-1, self.in_features)
            if x.is_cuda:  # the kernel computes in the scales' dtype (fp32 only interpreted)
                flat = flat.to(self.scales.dtype)
            y = torch.ops.qpipe.w8a16_linear(
                flat, self.qweight, self.scales, self.zeros, self.bias, self.group_size
            )
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        # Half-precision matmul on CPU is slow and not always implemented: compute in fp32.
        compute = torch.float32 if x.device.type == "cpu" else x.dtype
        w = self.dequantize(compute)
        b = None if self.bias is None else self.bias.to(compute)
        return F.linear(x.to(compute), w, b).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=8, "
            f"group_size={self.group_size}, symmetric={self.zeros is None}, kernel={self.kernel}"
        )
