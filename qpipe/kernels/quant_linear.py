"""``QuantLinear``: a drop-in ``nn.Linear`` holding 4-bit weights in the qpipe-w4 layout.

kernel="torch" dequantizes and calls ``F.linear`` (the reference, and the CPU path);
kernel="triton" runs the fused W4A16 kernels of ``qpipe.kernels.triton_w4a16`` (CUDA only).
Its state dict holds plain tensors (qweight, scales, zeros?, perm?, bias?) so it round-trips
through safetensors; rebuild the empty module with ``QuantLinear.from_config(ql.config())``
before ``load_state_dict``.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from qpipe.errors import BackendUnavailable
from qpipe.kernels import ops  # noqa: F401  (importing ops registers torch.ops.qpipe.*)
from qpipe.kernels.interpreter import interpreting
from qpipe.kernels.intweights import IntWeights, num_groups, quantize_rtn
from qpipe.kernels.layout import (
    LAYOUT_NAME,
    LAYOUT_VERSION,
    PACK,
    TILE_N,
    PackedW4,
    can_tile,
    dequantize_kernel_order,
    pack_w4,
    tile_w4,
    unpack_w4,
    untile_w4,
)

KERNELS = ("torch", "triton")
# Eager calls up to this many rows (decode batches) launch through a bound DirectLauncher.
DIRECT_MAX_M = 16
_UNBUILT = object()


@functools.cache
def kernel_available(kernel: str) -> str | None:
    """None if ``kernel`` can run here, else the reason it cannot. Cached: forward() asks on
    every call, and the package search behind the answer costs more than a decode kernel."""
    if kernel == "torch":
        return None
    if kernel != "triton":
        return f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}"
    if importlib.util.find_spec("triton") is None:
        return "triton kernel needs the 'triton' package; use kernel=torch"
    if not torch.cuda.is_available():
        return "triton kernel needs a CUDA device; use kernel=torch on CPU"
    return None


class QuantLinear(torch.nn.Module):
    """y = x @ W.T + b with W held as grouped int4 (qpipe-w4 layout, see ``layout.py``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        group_size: int = 128,
        symmetric: bool = True,
        act_order: bool = False,
        k_padded: int | None = None,
        dtype: torch.dtype = torch.float16,
        kernel: str = "torch",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        k = k_padded or in_features
        if k < in_features:
            raise ValueError(f"k_padded={k} is smaller than in_features={in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.bits = 4
        self.symmetric = symmetric
        self.act_order = act_order
        self.k_padded = k
        g = num_groups(k, group_size)
        words = -(-k // PACK)
        # Held tiled where the shape allows (layout.tile_w4: whole 1 KB tiles per K tile of a
        # kernel program), row-major otherwise; the kernels read the form from the shape.
        shape = (
            (out_features // TILE_N, TILE_N * words)
            if can_tile(out_features, words, group_size)
            else (out_features, words)
        )
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(g, out_features, dtype=dtype, device=device))
        self.register_buffer(
            "zeros",
            None if symmetric else torch.zeros(g, out_features, dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "perm", torch.arange(k, dtype=torch.int32, device=device) if act_order else None
        )
        if bias:
            self.bias = torch.nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self.kernel = kernel
        self._checked: tuple[torch.device, torch.dtype] | None = None
        # eager decode: (M, dtype, device index) -> DirectLauncher or None (use the slow path)
        self._launchers: dict[tuple[int, torch.dtype, int], Any] = {}

    # -- construction ------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Everything ``from_config`` needs to rebuild this module empty (JSON-serialisable)."""
        return {
            "layout": LAYOUT_NAME,
            "layout_version": LAYOUT_VERSION,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "group_size": self.group_size,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "act_order": self.act_order,
            "k_padded": self.k_padded,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_config(
        cls,
        cfg: dict[str, Any],
        *,
        kernel: str = "torch",
        device: torch.device | str | None = None,
    ) -> QuantLinear:
        if (
            cfg.get("layout", LAYOUT_NAME) != LAYOUT_NAME
            or cfg.get("layout_version", 1) > LAYOUT_VERSION
        ):
            raise ValueError(f"unsupported layout {cfg.get('layout')} v{cfg.get('layout_version')}")
        if cfg.get("bits", 4) != 4:
            raise ValueError("QuantLinear holds 4-bit weights only")
        return cls(
            cfg["in_features"],
            cfg["out_features"],
            bias=cfg["bias"],
            group_size=cfg["group_size"],
            symmetric=cfg["symmetric"],
            act_order=cfg["act_order"],
            k_padded=cfg["k_padded"],
            dtype=getattr(torch, cfg["dtype"]),
            kernel=kernel,
            device=device,
        )

    @classmethod
    def from_int(
        cls,
        w: IntWeights,
        bias: torch.Tensor | None = None,
        *,
        kernel: str = "torch",
        dtype: torch.dtype = torch.float16,
        in_features: int | None = None,
    ) -> QuantLinear:
        """Wrap exact integer weights. ``in_features`` < K means K was zero-padded (pad mode):
        forward pads x with zero columns, which is exact."""
        n, k = w.shape
        p = pack_w4(w, dtype)
        mod = cls(
            in_features or k,
            n,
            bias=bias is not None,
            group_size=w.group_size,
            symmetric=w.zeros is None,
            act_order=p.perm is not None,
            k_padded=k,
            dtype=dtype,
            kernel=kernel,
            device=w.q.device,
        )
        mod.qweight.copy_(mod.held_form(p.qweight))
        mod.scales.copy_(p.scales)
        if p.zeros is not None:
            mod.zeros.copy_(p.zeros)
        if p.perm is not None:
            mod.perm.copy_(p.perm)
        if bias is not None:
            mod.bias.data.copy_(bias.to(dtype))
        return mod

    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Linear,
        *,
        group_size: int,
        bits: int = 4,
        symmetric: bool = True,
        kernel: str = "torch",
        pad_to: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """RTN-quantize an nn.Linear. ``pad_to``: zero-pad K up to a multiple of it first."""
        if bits != 4:
            raise ValueError("QuantLinear holds 4-bit weights only")
        weight = linear.weight.detach()
        k = weight.shape[1]
        if pad_to:
            weight = F.pad(weight, (0, -(-k // pad_to) * pad_to - k))
        if dtype is None:
            dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else None
            dtype = dtype or torch.float16
        iw = quantize_rtn(
            weight, group_size=group_size, bits=bits, symmetric=symmetric, scale_dtype=dtype
        )
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_int(iw, bias, kernel=kernel, dtype=dtype, in_features=k)

    # -- use -----------------------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() replace the tensors the cached launchers point at
        self._launchers.clear()
        self._checked = None
        return super()._apply(fn, recurse)

    @property
    def dtype(self) -> torch.dtype:
        """The activation/scale dtype (follows ``module.to(dtype)``)."""
        return self.scales.dtype

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        if value not in KERNELS:
            raise ValueError(f"unknown kernel {value!r}; choose one of {', '.join(KERNELS)}")
        self._kernel = value

    @property
    def tiled(self) -> bool:
        """Whether qweight is held in ``layout.tile_w4``'s tiles (else row-major)."""
        return self.qweight.shape[0] != self.out_features

    def held_form(self, rows: torch.Tensor) -> torch.Tensor:
        """A row-major [N, W] qweight in the form this module holds (exact permutation)."""
        return tile_w4(rows) if self.tiled else rows

    def qweight_rows(self) -> torch.Tensor:
        """qweight as row-major [N, W] words (a copy when held tiled)."""
        return untile_w4(self.qweight) if self.tiled else self.qweight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A layout-version-1 checkpoint holds row-major words: tiled here, exactly.
        key = prefix + "qweight"
        got = state_dict.get(key)
        rows = (self.out_features, self.qweight.shape[1] // TILE_N)
        if got is not None and self.tiled and tuple(got.shape) == rows:
            state_dict[key] = tile_w4(got)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def packed(self) -> PackedW4:
        return PackedW4(
            qweight=self.qweight_rows(),
            scales=self.scales,
            zeros=self.zeros,
            perm=self.perm,
            group_size=self.group_size,
            k=self.k_padded,
        )

    def int_weights(self) -> IntWeights:
        """The held weights as exact IntWeights (original column order, K padded)."""
        return unpack_w4(self.packed())

    def dequantize(self) -> torch.Tensor:
        """[out_features, in_features] float32."""
        w = dequantize_kernel_order(self.packed())
        if self.perm is not None:
            orig = torch.empty_like(w)
            orig[:, self.perm.long()] = w
            w = orig
        return w[:, : self.in_features]

    def _prepare_input(self, x2: torch.Tensor) -> torch.Tensor:
        if self.k_padded > self.in_features:
            x2 = F.pad(x2, (0, self.k_padded - self.in_features))
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm.long())
        return x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {x.shape[-1]}")
        lead = x.shape[:-1]
        x2 = self._prepare_input(x.reshape(-1, self.in_features))
        y = self._forward_triton(x2) if self._kernel == "triton" else self._forward_torch(x2)
        return y.reshape(*lead, self.out_features)

    def _forward_torch(self, x2: torch.Tensor) -> torch.Tensor:
        # Half-precision matmul on CPU is slow and not always implemented: compute in fp32.
        compute = torch.float32 if x2.device.type == "cpu" else x2.dtype
        w = dequantize_kernel_order(self.packed(), compute)
        b = None if self.bias is None else self.bias.to(compute)
        return F.linear(x2.to(compute), w, b).to(x2.dtype)

    def _check_triton(self, x2: torch.Tensor) -> None:
        # Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: tests.
        interpreted = not x2.is_cuda and interpreting()
        if not interpreted:
            reason = kernel_available("triton")
            if reason is None and not x2.is_cuda:
                reason = "triton kernel needs its input on a CUDA device; move the model there"
            if reason is not None:
                raise BackendUnavailable(reason)
        if x2.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the triton kernel takes fp16/bf16 activations, got {x2.dtype}")

    def _forward_triton(self, x2: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # One opaque node for Dynamo/Inductor (see ops.py); the checks ran in eager warm-up.
            return torch.ops.qpipe.w4a16_linear(
                x2, self.qweight, self.scales, self.zeros, self.bias, self.group_size
            )
        # Eager: every microsecond of Python here is paid per layer per token, so the checks
        # run once per (device, dtype), and at decode sizes a bound launcher skips both the
        # op dispatcher and Triton's argument binding.
        if (x2.device, x2.dtype) != self._checked:
            self._check_triton(x2)
            self._checked = (x2.device, x2.dtype)
        from qpipe.kernels.triton_w4a16 import DirectLauncher
        from qpipe.kernels.tuning import w4a16_matmul

        m = x2.shape[0]
        if m <= DIRECT_MAX_M and x2.is_cuda and x2.is_contiguous() and x2.data_ptr() % 16 == 0:
            key = (m, x2.dtype, x2.get_device())
            launcher = self._launchers.get(key, _UNBUILT)
            if launcher is _UNBUILT and not torch.cuda.is_current_stream_capturing():
                from qpipe.kernels.tuning import TUNER

                args = (x2, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
                launcher = DirectLauncher.build(*args, TUNER.choose(*args))
                self._launchers[key] = launcher
            if launcher is not None and launcher is not _UNBUILT:
                return launcher(x2)
        return w4a16_matmul(x2, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, "
            f"symmetric={self.symmetric}, act_order={self.act_order}, "
            f"k_padded={self.k_padded}, kernel={self._kernel}"
        )
