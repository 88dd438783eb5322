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
import os
from typing import Any

import torch
import torch.nn.functional as F

from qpipe.errors import BackendUnavailable
from qpipe.kernels import ops  # noqa: F401  (importing ops registers torch.ops.qpipe.*)
from qpipe.kernels.interpreter import interpreting
from qpipe.kernels.intweights import IntWeights, num_groups, quantize_rtn
from qpipe.kernels.layout import (
    FRAG_K,
    FRAG_WORDS,
    LAYOUT_NAME,
    LAYOUT_VERSION,
    PACK,
    TILE_N,
    PackedW4,
    can_tile,
    dequantize_kernel_order,
    form_of,
    pack_w4,
    to_form,
    to_rows,
    unpack_w4,
)

KERNELS = ("torch", "triton")
# Eager calls up to this many rows (decode batches) launch through a bound launcher.
DIRECT_MAX_M = 64
_UNBUILT = object()


def default_form(n: int, words: int, group_size: int) -> str:
    """The qweight form a new module holds: the tiled form (layout v2) where the shape has
    whole tiles, row-major elsewhere; the fragment order (layout v3) with ``QPIPE_FRAG=1``.
    The fragment kernel is opt-in until it wins at every M: on an H100 it beat the v2 kernels
    at M = 4 on large shapes (24576x4096: 2.86x fp16 against 1.99x) but lost at M >= 64
    (4096x4096, M = 64: 0.52x against 0.99x; bench/results/kernels_h100_fp8.md), so prefill
    would slow down. A device without the fragment kernel converts fragments to tiles at
    its first call."""
    if not can_tile(n, words, group_size):
        return "rows"
    chunks = group_size // FRAG_K  # the fragment kernel's groups: 64 x a power of two columns
    if os.environ.get("QPIPE_FRAG", "") != "1" or chunks & (chunks - 1):
        return "tiled"
    return "frag"


def _shape_of(form: str, n: int, words: int) -> tuple[int, ...]:
    if form == "frag":
        return (n // TILE_N, words * PACK // FRAG_K, FRAG_WORDS)
    return (n // TILE_N, TILE_N * words) if form == "tiled" else (n, words)


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
        # Held in the fragment order where the shape has whole tiles (layout v3), row-major
        # otherwise; the kernels and the state-dict loader tell the form from the shape.
        shape = _shape_of(default_form(out_features, words, group_size), out_features, words)
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
        # eager decode: (elements of x, dtype, device index) -> a bound launcher or None (the
        # op's path)
        self._launchers: dict[tuple[int, torch.dtype, int], Any] = {}
        self._direct = False  # set by the first triton call: forward's fast path is open

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
        self._direct = False
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
    def runs_on(self) -> str:
        """The kernel this layer runs on, as a run reports it: ``frag`` (the CUDA fragment
        kernel on layout v3's fragment order, where it is checked), ``triton`` or ``torch``."""
        if self.kernel == "triton" and self.form == "frag" and self.qweight.is_cuda:
            from qpipe.kernels.frag_w4a16 import unavailable

            if unavailable(self.qweight.device) is None:
                return "frag"
        return self.kernel

    @property
    def form(self) -> str:
        """How qweight is held: "frag" (layout v3's fragment order), "tiled" (v2's 1 KB tiles)
        or "rows" (row-major, every shape)."""
        return form_of(self.qweight, self.out_features)

    @property
    def tiled(self) -> bool:
        """Whether qweight is held in ``layout.tile_w4``'s tiles."""
        return self.form == "tiled"

    def held_form(self, rows: torch.Tensor) -> torch.Tensor:
        """A row-major [N, W] qweight in the form this module holds (exact permutation)."""
        return to_form(rows, self.out_features, self.form)

    def qweight_rows(self) -> torch.Tensor:
        """qweight as row-major [N, W] words (a copy when held in another form)."""
        return to_rows(self.qweight, self.out_features)

    def convert_form(self, form: str) -> None:
        """Hold qweight in ``form`` from now on (exact; "tiled" and "frag" need whole tiles)."""
        words = -(-self.k_padded // PACK)
        chunks = self.group_size // FRAG_K
        if (form != "rows" and not can_tile(self.out_features, words, self.group_size)) or (
            form == "frag" and chunks & (chunks - 1)
        ):
            raise ValueError(f"{self.out_features} x {self.k_padded} at group {self.group_size} "
                             f"has no {form} form")  # fmt: skip
        if form != self.form:
            self.qweight = to_form(self.qweight, self.out_features, form)
            self._launchers.clear()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of layout versions 1 (rows) and 2 (tiles), or a module that held another
        # form: converted to the form held here, exactly (the form is told by the shape).
        key = prefix + "qweight"
        got = state_dict.get(key)
        words = -(-self.k_padded // PACK)
        shapes = {_shape_of(f, self.out_features, words) for f in ("rows", "tiled", "frag")}
        if (
            isinstance(got, torch.Tensor)
            and tuple(got.shape) in shapes
            and tuple(got.shape) != tuple(self.qweight.shape)
        ):
            state_dict[key] = to_form(got, self.out_features, self.form)
        self._launchers.clear()  # assign=True replaces the tensors bound launchers point at
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def packed(self) -> PackedW4:
        return PackedW4(
            qweight=self.qweight,
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
        # Eager decoding's fast path (a few microseconds of Python): a launcher bound for this
        # many elements takes x as it is, any leading shape, and returns y in x's shape.
        # (is_compiling first: Dynamo prunes the branch and never sees the launchers)
        if not torch.compiler.is_compiling() and self._direct and x.shape[-1] == self.in_features:
            launcher = self._launchers.get((x.numel(), x.dtype, x.get_device()))
            if launcher is not None and launcher.takes(x):
                return launcher(x)
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
        # run once per (device, dtype), and at decode sizes a bound launcher skips the op
        # dispatcher, the tuner's lookup and (Triton kernels) Triton's argument binding.
        if (x2.device, x2.dtype) != self._checked:
            self._check_triton(x2)
            self._settle_form(x2.device)
            self._checked = (x2.device, x2.dtype)
            # inputs that need no padding or permutation may take forward's fast path
            self._direct = self.k_padded == self.in_features and self.perm is None
        key = (x2.numel(), x2.dtype, x2.get_device())
        launcher = self._launchers.get(key, _UNBUILT)
        if launcher is _UNBUILT:
            launcher = self._build_launcher(x2)
            if launcher is not _UNBUILT:
                self._launchers[key] = launcher
        if launcher is not None and launcher is not _UNBUILT and launcher.takes(x2):
            return launcher(x2)
        from qpipe.kernels.tuning import w4a16_matmul

        return w4a16_matmul(x2, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def _settle_form(self, device: torch.device) -> None:
        """Fragment-order weights on a device without the fragment kernel: converted to the
        tiled form once (exact), so today's Triton kernels run them from here on."""
        if self.form != "frag":
            return
        from qpipe.kernels.frag_w4a16 import unavailable

        if unavailable(device) is not None:
            self.convert_form("tiled")

    def _build_launcher(self, x2: torch.Tensor):
        """A bound launcher for this M (None: use the op's path for it), or _UNBUILT where
        this call cannot build one (not cached: a later call may)."""
        if (
            not x2.is_cuda
            or x2.shape[0] > DIRECT_MAX_M
            or not x2.is_contiguous()
            or x2.data_ptr() % 16
            or torch.cuda.is_current_stream_capturing()
        ):
            return _UNBUILT
        from qpipe.kernels.tuning import TUNER

        args = (x2, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
        cfg = TUNER.choose(*args)
        if cfg.kind == "dense":  # the prefill path (several launches): the op's path runs it
            return None
        if self.form == "frag":
            from qpipe.kernels.frag_w4a16 import FragLauncher

            return FragLauncher(*args, cfg)
        from qpipe.kernels.triton_w4a16 import DirectLauncher

        return DirectLauncher.build(*args, cfg)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}, "
            f"symmetric={self.symmetric}, act_order={self.act_order}, "
            f"k_padded={self.k_padded}, kernel={self._kernel}"
        )
