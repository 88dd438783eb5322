"""The fragment-order W4A16 kernel (``w4_frag.cu``, layout v3) from Python: where it runs,
its launch configurations, and its launches.

The kernel is CUDA C++ compiled at run time by NVRTC (``cuda_rtc.py``) for the device's own
architecture. New modules hold fragment-order weights only with ``QPIPE_FRAG=1`` (it is
opt-in while it loses to the v2 kernels at M >= 64: ``quant_linear.default_form``); it runs
only where it was checked: compute capability 9.0 (H100, H200), 8.x with ``QPIPE_FRAG=1``,
nowhere with ``QPIPE_FRAG=0``; and on a device only after a self-check (a small problem of
each activation dtype against the torch reference) has passed there. Elsewhere ``unavailable`` says why, and QuantLinear converts its weights to the tiled
form (layout v2, exact) for the Triton kernels.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qpipe.kernels import cuda_rtc
from qpipe.kernels.layout import FRAG_K, FRAG_WORDS, TILE_N
from qpipe.kernels.workspace import WORKSPACE

SOURCE_PATH = Path(__file__).with_name("w4_frag.cu")
# Compute capabilities the kernel has been checked on (the GPU tests and the kernel bench).
TESTED = frozenset({(9, 0)})
PARAMS = 15  # the kernel's parameters: 8 pointers, then 7 ints
X_SLOT, Y_SLOT = 0, 5  # the pointers that change per call


@dataclass(frozen=True)
class FragConfig:
    """One launch configuration of ``w4_frag_kernel``: ``t`` n8 tiles (8 t activation rows
    per block), ``r`` 16-row weight tiles per warp, ``warps`` per block, ``prefetch`` 64-column
    chunks in flight per warp, and the split of K across blocks."""

    kind: str = "frag"
    t: int = 1
    r: int = 1
    warps: int = 4
    prefetch: int = 4
    split_k: int = 1

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def takes_group(group_size: int) -> bool:
    """Groups the kernel reads: 64 columns times a power of two (64, 128, 256, ...)."""
    chunks = group_size // FRAG_K
    return group_size % FRAG_K == 0 and chunks > 0 and chunks & (chunks - 1) == 0


def t_for(m: int) -> int:
    """n8 tiles per block for M activation rows (M > 64 runs in blocks of 64)."""
    return 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8


def frag_dims(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a fragment-order qweight [N / 16, K / 64, 128]."""
    n = scales.shape[1]
    if qweight.dim() != 3 or qweight.shape[2] != FRAG_WORDS or qweight.shape[0] * TILE_N != n:
        raise ValueError(f"qweight {tuple(qweight.shape)} is not the fragment order of N = {n}")
    return n, qweight.shape[1] * FRAG_K


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(blocks: int, chunks: int, sms: int, prefetch: int, waves: float) -> int:
    """Smallest power-of-two split giving about ``waves`` blocks per SM, each split keeping
    at least ``prefetch`` chunks (a full pipeline)."""
    split = 1
    while blocks * split < waves * sms and chunks // (split * 2) >= max(prefetch, 2):
        split *= 2
    return split


# (r, warps, prefetch) per t: deep prefetch where the accumulators are few
_SHAPES = {
    1: ((1, 4, 4), (2, 4, 2), (1, 8, 4), (1, 4, 3)),
    2: ((1, 4, 3), (2, 4, 2), (1, 8, 3)),
    4: ((1, 4, 2), (2, 4, 2), (1, 8, 2)),
    8: ((1, 4, 2), (2, 4, 2), (2, 4, 1)),
}


def heuristic(m: int, n: int, k: int, device: torch.device) -> FragConfig:
    t = t_for(m)
    r, warps, prefetch = _SHAPES[t][0]
    blocks = -(-n // (warps * r * TILE_N)) * -(-m // (8 * t))
    split = _split(blocks, k // FRAG_K, _num_sms(device), prefetch, 2.0)
    return FragConfig(t=t, r=r, warps=warps, prefetch=prefetch, split_k=split)


def candidates(m: int, n: int, k: int, device: torch.device) -> list[FragConfig]:
    """A few block shapes x the splits that give between one and eight blocks per SM."""
    t = t_for(m)
    sms = _num_sms(device)
    chunks = k // FRAG_K
    out = []
    for r, warps, prefetch in _SHAPES[t]:
        blocks = -(-n // (warps * r * TILE_N)) * -(-m // (8 * t))
        splits = [
            s for s in (1, 2, 4, 8, 16, 32)
            if chunks // s >= 2 and sms <= blocks * s <= 8 * sms
        ] or [_split(blocks, chunks, sms, prefetch, 2.0)]  # fmt: skip
        out += [FragConfig(t=t, r=r, warps=warps, prefetch=prefetch, split_k=s) for s in splits]
    base = heuristic(m, n, k, device)
    return out if base in out else [*out, base]


# -- compiling --------------------------------------------------------------------------------


@functools.cache
def _source() -> str:
    return SOURCE_PATH.read_text()


def _expr(cfg: FragConfig, bf16: bool, has_z: bool, has_bias: bool) -> str:
    flags = ", ".join("true" if f else "false" for f in (bf16, has_z, has_bias))
    return f"w4_frag_kernel<{cfg.t}, {cfg.r}, {cfg.warps}, {cfg.prefetch}, {flags}>"


COMPILED: dict[tuple[str, str], cuda_rtc.Kernel] = {}  # (instantiation, arch) -> kernel


def _kernel(expr: str, arch: str) -> cuda_rtc.Kernel:
    kernel = COMPILED.get((expr, arch))
    if kernel is None:
        cubin, lowered = cuda_rtc.compile_cubin(_source(), [expr], arch)
        kernel = COMPILED[(expr, arch)] = cuda_rtc.Kernel(cubin, lowered[expr])
    return kernel


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def kernel_for(
    cfg: FragConfig, dtype: torch.dtype, has_z: bool, has_bias: bool, device: torch.device
) -> cuda_rtc.Kernel:
    return _kernel(_expr(cfg, dtype == torch.bfloat16, has_z, has_bias), _arch(device))


# -- launching --------------------------------------------------------------------------------


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x with unit column stride, rows 16-byte aligned (the kernel's 16-byte loads)."""
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
    return x


def plan(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    cfg: FragConfig,
    y: torch.Tensor,
) -> tuple[cuda_rtc.BoundLaunch, tuple[torch.Tensor, ...]]:
    """A bound launch of one call, and the tensors it points at (keep them alive with it)."""
    m, k = x.shape
    n, kq = frag_dims(qweight, scales)
    if k != kq:
        raise ValueError(f"qweight holds {kq} columns, x has {k}")
    if not takes_group(group_size) or kq % group_size:
        raise ValueError(f"the fragment kernel needs groups of 64 x 2**i columns, got {group_size}")
    if x.dtype not in (torch.float16, torch.bfloat16) or scales.dtype != x.dtype:
        raise ValueError(f"fp16/bf16 activations with scales of their dtype, got {x.dtype} and "
                         f"{scales.dtype}")  # fmt: skip
    grid, block, ints = geometry(m, n, k, x.stride(0), group_size, cfg)
    ws, cnt = WORKSPACE.for_launch(x.device, cfg.split_k, m, n, grid[0] * grid[2])
    kernel = kernel_for(cfg, x.dtype, zeros is not None, bias is not None, x.device)
    pointers = [
        x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
        (zeros if zeros is not None else scales).data_ptr(),
        (bias if bias is not None else scales).data_ptr(),
        y.data_ptr(), ws.data_ptr(), cnt.data_ptr(),
    ]  # fmt: skip
    bound = cuda_rtc.BoundLaunch(kernel, x.device, grid, block, pointers, ints)
    return bound, (qweight, scales, zeros, bias, ws, cnt)


def geometry(
    m: int, n: int, k: int, stride_xm: int, group_size: int, cfg: FragConfig
) -> tuple[tuple[int, int, int], int, list[int]]:
    """(grid, threads per block, the kernel's int parameters) of one launch: blocks of
    warps x r x 16 rows, the splits of K's 64-column chunks, blocks of 8 t activation rows."""
    chunks = k // FRAG_K
    per_split = -(-chunks // cfg.split_k)
    grid = (-(-n // (cfg.warps * cfg.r * TILE_N)), cfg.split_k, -(-m // (8 * cfg.t)))
    shift = (group_size // FRAG_K).bit_length() - 1  # log2 of a group's chunks
    return grid, cfg.warps * 32, [m, n, k, stride_xm, shift, cfg.split_k, per_split]


def launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    cfg: FragConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W.T (+ bias) with one explicit configuration."""
    x = _aligned(x)
    y = out if out is not None else torch.empty(x.shape[0], scales.shape[1], dtype=x.dtype,
                                                device=x.device)  # fmt: skip
    if tuple(y.shape) != (x.shape[0], scales.shape[1]) or not y.is_contiguous():
        raise ValueError(f"out is {tuple(y.shape)}, the product is {(x.shape[0], scales.shape[1])}")
    bound, _ = plan(x, qweight, scales, zeros, group_size, bias, cfg, y)
    bound()
    return y


class FragLauncher:
    """One layer's launch at one M, bound once (eager decoding): a call is an empty(), two
    pointer writes and ``cuLaunchKernel``."""

    def __init__(self, x, qweight, scales, zeros, group_size, bias, cfg: FragConfig) -> None:
        y = torch.empty(x.shape[0], scales.shape[1], dtype=x.dtype, device=x.device)
        self._bound, self._keep = plan(x, qweight, scales, zeros, group_size, bias, cfg, y)
        if x.stride(0) != x.shape[1] or x.stride(1) != 1:
            raise ValueError("a bound launch takes contiguous rows")
        self._n = scales.shape[1]
        self.cfg = cfg

    def takes(self, x: torch.Tensor) -> bool:
        """Whether ``x`` (rows of K, any leading shape) has the layout the launch was bound
        for: contiguous, 16-byte aligned."""
        return x.is_contiguous() and x.data_ptr() % 16 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[:-1] + (self._n,), dtype=x.dtype, device=x.device)
        self._bound.set_pointer(X_SLOT, x.data_ptr())
        self._bound.set_pointer(Y_SLOT, y.data_ptr())
        self._bound()
        return y


# -- where it runs ----------------------------------------------------------------------------


def _reference(x, qweight, scales, zeros, group_size, bias) -> torch.Tensor:
    from qpipe.kernels.layout import unpack_q

    n, k = frag_dims(qweight, scales)
    q = unpack_q(qweight, n, k).float()
    grp = torch.arange(k, device=q.device) // group_size
    z = 8.0 if zeros is None else zeros.float().t()[:, grp]
    w = ((q - z) * scales.float().t()[:, grp]).to(x.dtype).float()
    y = x.float() @ w.t()
    return y if bias is None else y + bias.float()


def check_against_reference(y, x, qweight, scales, zeros, group_size, bias, what: str) -> None:
    """A self-check's verdict on one launch: ``y`` within the relative error the kernel tests
    allow (fp16 2e-3, bf16 1e-2) of the fp32 reference, else a RuntimeError naming ``what``."""
    ref = _reference(x, qweight, scales, zeros, group_size, bias)
    rel = float((y.float() - ref).norm() / ref.norm())
    tol = 2e-3 if x.dtype == torch.float16 else 1e-2
    if not rel < tol:
        raise RuntimeError(f"{what}: relative error {rel:.3g} >= {tol}")


def self_check(device: torch.device) -> None:
    """Run small problems of both activation dtypes (symmetric and not, with and without a
    split, bias, M past one block) against the torch reference; raise on any difference
    beyond the output's rounding."""
    from qpipe.kernels.layout import frag_w4, pack_int4_rows

    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype, m, sym, split in ((torch.float16, 3, False, 3), (torch.bfloat16, 12, True, 1)):
        n, k, gs = 96, 512, 128
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        qw = frag_w4(pack_int4_rows(q)).to(device)
        s = (torch.rand(k // gs, n, generator=gen) * 0.02 + 0.002).to(device, dtype)
        z = (
            None
            if sym
            else torch.randint(0, 16, (k // gs, n), generator=gen).to(device, torch.uint8)
        )
        b = torch.randn(n, generator=gen).to(device, dtype)
        x = torch.randn(m, k, generator=gen).to(device, dtype)
        cfg = FragConfig(t=t_for(m), r=1, warps=4, prefetch=2, split_k=split)
        y = launch(x, qw, s, z, gs, b, cfg)
        torch.cuda.synchronize(device)
        check_against_reference(y, x, qw, s, z, gs, b, f"{dtype} M={m} split {split}")


_REASONS: dict[int, str | None] = {}


def unavailable(device: torch.device) -> str | None:
    """None where the fragment kernel runs on ``device``, else why not (checked once per
    device: the environment, the compute capability, NVRTC, then the self-check)."""
    if device.type != "cuda":
        return "the fragment kernel needs a CUDA device"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _REASONS:
        return _REASONS[index]
    reason = None
    env = os.environ.get("QPIPE_FRAG", "")
    cap = torch.cuda.get_device_capability(index)
    if env == "0":
        reason = "disabled by QPIPE_FRAG=0"
    elif cap < (8, 0):
        reason = f"needs compute capability 8.0+ (bf16 mma.sync), this GPU has {cap[0]}.{cap[1]}"
    elif cap not in TESTED and env != "1":
        reason = (f"not checked on compute capability {cap[0]}.{cap[1]} yet "
                  f"(QPIPE_FRAG=1 runs it there)")  # fmt: skip
    else:
        try:
            self_check(torch.device("cuda", index))
        except Exception as err:  # noqa: BLE001 (no NVRTC, a compile error, a wrong result)
            reason = f"self-check failed: {type(err).__name__}: {str(err)[:300]}"
    _REASONS[index] = reason
    return reason
