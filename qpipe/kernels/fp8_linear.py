"""``Fp8Linear``: a drop-in ``nn.Linear`` holding FP8 (e4m3) weights with one fp32 scale per
output channel, the layout of a compressed-tensors ``float-quantized`` checkpoint.

Two kernels:
- ``scaled_mm`` (GPUs with FP8 tensor cores, compute capability ≥ 8.9): the activations are
  quantized to e4m3 per token at run time (dynamic scales, W8A8) and one ``torch._scaled_mm``
  multiplies them with the weight, applying both scales in its epilogue;
- ``torch`` (every other GPU, and the CPU): weight-only, the weight dequantized to the
  compute dtype for each call (``w.to(dtype) * scale``), then one matmul.
A layer whose shape the FP8 matmul cannot take (K or N not a multiple of 16) runs weight-only.

At decode (at most 4 rows of x after flattening) both give way, on any GPU Triton compiles for
(compute capability 8.0 and later), to qpipe's FP8 GEMV (``triton_fp8.py``): weight-only
numerics (x in its own precision, fp32 products and sums), streaming the e4m3 bytes once. A
step of a few tokens is bound by reading the weights; per-token quantization plus a
tensor-core tile sized for many rows made W8A8 barely faster than bf16 there, while 1 byte a
weight against bf16's 2 is what a GEMV can turn into speed. The layer then reports
``e4m3_gemv+<kernel>`` (GEMV at M <= 4, the other kernel above).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from qpipe.kernels import ops  # noqa: F401  (registers torch.ops.qpipe.e4m3_gemv)
from qpipe.kernels.interpreter import interpreting

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
KERNELS = ("scaled_mm", "torch")
_ALIGN = 16  # _scaled_mm wants K and N multiples of 16
GEMV_MAX_M = 4  # rows of x up to which the FP8 GEMV runs (triton_fp8.GEMV_MAX_M)


@functools.cache
def fp8_tensor_cores(device_index: int = 0) -> bool:
    """Whether this machine's GPU multiplies FP8 on its tensor cores (sm_89 and later)."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


@functools.cache
def gemv_available(device_index: int = 0) -> bool:
    """Whether the FP8 GEMV runs on this GPU: Triton present and compute capability ≥ 8.0.
    It needs no FP8 hardware (integer bit moves dequantize the bytes); 8.0 is the oldest
    target it was compiled for."""
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [N, K] as e4m3 with one fp32 scale per row (symmetric, absmax / 448):
    what llm-compressor's FP8_DYNAMIC scheme writes, for tests and references."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` [M, K] as e4m3 and the fp32 scale [M, 1] the matmul multiplies back.
    Each value is scaled in fp32 and rounded to e4m3 once: eager and compiled code (Inductor
    fuses this into one kernel computing in fp32) then give the same e4m3 codes, where a
    division in ``x``'s dtype would round twice (bf16, then e4m3) and flip codes."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    q = x.float().mul_(scale.reciprocal()).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(torch.nn.Module):
    """y = x @ (W8 · s).T + b, W8 e4m3 [N, K], s fp32 [N]."""

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        kernel: str = "torch",
        gemv: bool = True,
    ) -> None:
        super().__init__()
        if weight.dtype != FP8:
            raise ValueError(f"Fp8Linear holds {FP8} weights, got {weight.dtype}")
        if kernel not in KERNELS:
            raise ValueError(f"Fp8Linear kernel={kernel!r}: one of {', '.join(KERNELS)}")
        self.out_features, self.in_features = weight.shape
        aligned = self.in_features % _ALIGN == 0 and self.out_features % _ALIGN == 0
        self.kernel = kernel if aligned else "torch"
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", scale.reshape(-1).float().contiguous())
        self.bias = (
            None if bias is None else torch.nn.Parameter(bias.to(dtype), requires_grad=False)
        )
        # the GEMV at M <= 4 (False: ``kernel`` at every M, e.g. to measure W8A8 at decode)
        self.gemv = gemv and self.in_features % 4 == 0  # it reads whole 4-byte words
        self._gemv_here = self._gemv_device()

    def _gemv_device(self) -> bool:
        """Whether the weights sit where the GEMV runs: a GPU it compiles for, or Triton's CPU
        interpreter (the tests). Kept in a plain attribute, refreshed when the module moves,
        so that forward (and a compiled graph's guards) reads a constant."""
        if self.weight.is_cuda:
            return gemv_available(self.weight.device.index or 0)
        return interpreting()

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._gemv_here = self._gemv_device()
        return out

    @property
    def runs_on(self) -> str:
        """The kernels this layer runs on, as a run reports them: ``e4m3_gemv+<kernel>`` where
        the GEMV takes the calls of at most 4 rows, else ``kernel``."""
        return f"e4m3_gemv+{self.kernel}" if self.gemv and self._gemv_here else self.kernel

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out_features, in_features] in ``dtype``."""
        return self.weight.to(dtype).mul_(self.weight_scale.to(dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.gemv and self._gemv_here and 0 < x2.shape[0] <= GEMV_MAX_M:
            y = torch.ops.qpipe.e4m3_gemv(x2, self.weight, self.weight_scale, self.bias)
        elif self.kernel == "scaled_mm" and x.is_cuda:
            xq, xs = quantize_per_token(x2)
            y = torch._scaled_mm(
                xq,
                self.weight.t(),
                scale_a=xs,
                scale_b=self.weight_scale.view(1, -1),
                out_dtype=x.dtype,
            )
            if self.bias is not None:
                y = y + self.bias
        else:
            # Half-precision matmul on CPU is slow and not always implemented: fp32 there.
            compute = torch.float32 if x.device.type == "cpu" else x.dtype
            b = None if self.bias is None else self.bias.to(compute)
            y = F.linear(x2.to(compute), self.dequantize(compute), b).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kernel={self.runs_on}"
        )
