"""Fragment-order weights at large M (prefill): dequantize a chunk of rows to a dense fp16/bf16
weight (``w4_frag_dequant`` in ``w4_frag.cu``), let cuBLAS multiply it, next chunk.

Why: the fragment kernel dequantizes a weight tile once per block of 8 T <= 64 activation rows
and its mma.sync main loop is built for M <= 8; on an H100 it lost to the v2 Triton kernels from
M = 64 on (bench/results/kernels_h100.md: 0.52-1.04x fp16 at M = 64, 0.28-0.45x at 256).
Dequantizing once per call costs about N K / 2 bytes read plus N K 2 bytes written and read
again, independent of M, while the GEMM's work grows with M: with B bytes/s of HBM and F
FLOP/s of tensor cores, the dequantization is a fraction ~ (2.5 N K / B) / (2 M N K / F)
= 1.25 F / (B M) of a compute-bound GEMM: ~ 1.25 x 300 / M on an H100 (its datasheet: 989
dense fp16 TFLOP/s, 3.35 TB/s), under 20 % from M ~ 2000. Below that the chunking matters: a chunk of at most
``MAX_CHUNK_BYTES`` is written and read again inside the L2 (50 MB on an H100), so from HBM the
call reads the 4-bit weights once and cuBLAS reads the dense chunk from L2; the crossover
against the fragment kernel is then measured, not derived: the tuner offers these
configurations beside the fragment kernel's from ``TUNE_MIN_M`` rows on and keeps the faster
per M bucket; the heuristic (no timing: inside a CUDA-graph capture, ``QPIPE_AUTOTUNE=0``)
takes this path from ``DENSE_MIN_M`` rows on.

Exact: the dense weight is (q - z) * s rounded once to the activation dtype, the torch
reference's weight bit for bit (``reference_rows``; the self-check compares every bit), and
the product is cuBLAS's, as ``F.linear`` on the reference weight computes it.

Memory: one buffer of ``MAX_CHUNK_BYTES`` per device, allocated at the first call and never
grown (CUDA graphs keep its address): the transient this path adds beside the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from qpipe.kernels import cuda_rtc
from qpipe.kernels.layout import FRAG_K, TILE_N

# A chunk's dense weight: written, then read by the GEMM while it is still in the L2.
MAX_CHUNK_BYTES = 32 << 20
CHUNK_BYTES = (8 << 20, 16 << 20, 32 << 20)  # the tuner's candidates
DEFAULT_CHUNK_BYTES = 16 << 20
DENSE_MIN_M = 128  # the heuristic's crossover (the fragment kernel's block is 64 rows at most)
TUNE_MIN_M = 32  # the tuner times this path from here on
WARPS = 8  # w4_frag_dequant's block: 8 warps, a 16 x 64 tile each


@dataclass(frozen=True)
class DenseConfig:
    """The prefill path's one choice: how many weight rows (a multiple of 16) a chunk holds."""

    kind: str = "dense"
    chunk_rows: int = 1024

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def rows_for(chunk_bytes: int, n: int, k: int) -> int:
    """Rows of a chunk of at most ``chunk_bytes`` (at least one 16-row tile, at most N)."""
    rows = max(TILE_N, chunk_bytes // (2 * k) // TILE_N * TILE_N)
    return min(rows, n)


def heuristic(m: int, n: int, k: int) -> DenseConfig:
    return DenseConfig(chunk_rows=rows_for(DEFAULT_CHUNK_BYTES, n, k))


def candidates(m: int, n: int, k: int) -> list[DenseConfig]:
    """The chunk sizes the tuner times (none below ``TUNE_MIN_M`` rows)."""
    if m < TUNE_MIN_M:
        return []
    rows = sorted({rows_for(b, n, k) for b in CHUNK_BYTES})
    return [DenseConfig(chunk_rows=r) for r in rows]


# -- the dequantization -----------------------------------------------------------------------


def reference_rows(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    row0: int,
    out: torch.Tensor,
) -> None:
    """``out[r, K]`` = rows row0 .. row0 + r of W, (q - z) * s in float32 rounded once to
    out's dtype (``layout.dequantize_kernel_order``'s weights), in torch from the fragment
    order: what ``w4_frag_dequant`` must write bit for bit, and the path on a CPU."""
    from qpipe.kernels.layout import unpack_q

    rows, k = out.shape
    tiles = qweight[row0 // TILE_N : (row0 + rows) // TILE_N]
    q = unpack_q(tiles, rows, k).float()
    grp = torch.arange(k, device=q.device) // group_size
    s = scales[:, row0 : row0 + rows].float().t()[:, grp]
    z = 8.0 if zeros is None else zeros[:, row0 : row0 + rows].float().t()[:, grp]
    out.copy_(((q - z) * s).to(out.dtype))


def _expr(bf16: bool, has_z: bool) -> str:
    return f"w4_frag_dequant<{str(bf16).lower()}, {str(has_z).lower()}>"


def dequant_geometry(k: int, rows: int) -> tuple[int, int]:
    """(blocks, threads per block) of one ``w4_frag_dequant`` launch over ``rows`` rows."""
    jobs = rows // TILE_N * (k // FRAG_K)
    return -(-jobs // WARPS), WARPS * 32


def cuda_rows(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    row0: int,
    out: torch.Tensor,
) -> None:
    """``reference_rows`` by ``w4_frag_dequant`` on the GPU (NVRTC, the fragment kernel's
    source and cache)."""
    from qpipe.kernels.frag_w4a16 import _arch, _kernel

    rows, k = out.shape
    n = scales.shape[1]
    if row0 % TILE_N or rows % TILE_N or not out.is_contiguous() or out.data_ptr() % 16:
        raise ValueError(f"rows {row0}..{row0 + rows} into {tuple(out.shape)}: whole 16-row "
                         "tiles into a contiguous, 16-byte aligned weight")  # fmt: skip
    kernel = _kernel(_expr(out.dtype == torch.bfloat16, zeros is not None), _arch(out.device))
    blocks, threads = dequant_geometry(k, rows)
    shift = (group_size // FRAG_K).bit_length() - 1
    pointers = [
        qweight.data_ptr(), scales.data_ptr(),
        (zeros if zeros is not None else scales).data_ptr(), out.data_ptr(),
    ]  # fmt: skip
    ints = [n, k, shift, row0 // TILE_N, rows // TILE_N]
    cuda_rtc.BoundLaunch(kernel, out.device, (blocks, 1, 1), threads, pointers, ints)()


class _ChunkBuffers:
    """One ``MAX_CHUNK_BYTES`` buffer per device (or more where 16 rows of K need it), never
    grown afterwards: a captured CUDA graph keeps pointing at it. Run a layer once before
    capturing it (as for the split-K workspace)."""

    def __init__(self) -> None:
        self._bufs: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device, nbytes: int) -> torch.Tensor:
        buf = self._bufs.get(device)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, MAX_CHUNK_BYTES), dtype=torch.uint8, device=device)
            self._bufs[device] = buf
        return buf


BUFFERS = _ChunkBuffers()

Dequant = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int, torch.Tensor], None]


def launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    cfg: DenseConfig,
    out: torch.Tensor | None = None,
    dequant: Dequant | None = None,
) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W.T (+ bias), W in the fragment order, a chunk of ``cfg.chunk_rows``
    rows at a time: dequantized (``cuda_rows`` on a GPU, ``reference_rows`` elsewhere unless
    ``dequant`` is given), then one cuBLAS GEMM into the chunk's columns of y."""
    from qpipe.kernels.frag_w4a16 import frag_dims, takes_group

    m, k = x.shape
    n, kq = frag_dims(qweight, scales)
    if k != kq:
        raise ValueError(f"qweight holds {kq} columns, x has {k}")
    if not takes_group(group_size) or kq % group_size:
        raise ValueError(f"fragment-order weights come in groups of 64 x 2**i columns, got "
                         f"{group_size}")  # fmt: skip
    if x.dtype not in (torch.float16, torch.bfloat16) or scales.dtype != x.dtype:
        raise ValueError(f"fp16/bf16 activations with scales of their dtype, got {x.dtype} and "
                         f"{scales.dtype}")  # fmt: skip
    rows = cfg.chunk_rows
    if rows <= 0 or rows % TILE_N:
        raise ValueError(f"chunk_rows must be a positive multiple of {TILE_N}, got {rows}")
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if tuple(y.shape) != (m, n) or y.stride(1) != 1:
        raise ValueError(f"out is {tuple(y.shape)}, the product is {(m, n)}")
    if dequant is None:
        dequant = cuda_rows if x.is_cuda else reference_rows
    rows = min(rows, n)
    buf = BUFFERS.get(x.device, rows * k * x.element_size()).view(x.dtype)
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        w = buf[: r * k].view(r, k)
        dequant(qweight, scales, zeros, group_size, n0, w)
        cols = y if r == n else y[:, n0 : n0 + r]  # a column slice: cuBLAS's ldc = N
        if bias is None:
            torch.mm(x, w.t(), out=cols)
        else:
            torch.addmm(bias[n0 : n0 + r], x, w.t(), out=cols)
    return y


# -- where it runs ----------------------------------------------------------------------------


def self_check(device: torch.device) -> None:
    """Both activation dtypes, symmetric and not: ``w4_frag_dequant``'s rows against
    ``reference_rows`` bit for bit, and the chunked product (two chunks, the last one short,
    bias) against the torch reference within the output's rounding; raise otherwise."""
    from qpipe.kernels.frag_w4a16 import check_against_reference
    from qpipe.kernels.layout import frag_w4, pack_int4_rows

    gen = torch.Generator(device="cpu").manual_seed(1)
    n, k, gs, m = 96, 512, 128, 40
    for dtype, sym in ((torch.float16, False), (torch.bfloat16, True)):
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
        got = torch.empty(48, k, dtype=dtype, device=device)
        want = torch.empty_like(got)
        cuda_rows(qw, s, z, gs, 32, got)
        reference_rows(qw, s, z, gs, 32, want)
        torch.cuda.synchronize(device)
        if not torch.equal(got, want):
            raise RuntimeError(f"{dtype}: w4_frag_dequant differs from the reference weights")
        y = launch(x, qw, s, z, gs, b, DenseConfig(chunk_rows=64))
        torch.cuda.synchronize(device)
        check_against_reference(y, x, qw, s, z, gs, b, f"{dtype} dense M={m}")


_REASONS: dict[int, str | None] = {}


def unavailable(device: torch.device) -> str | None:
    """None where the dense path runs on ``device`` (where the fragment kernel runs, and after
    its own self-check passed there), else why not."""
    from qpipe.kernels.frag_w4a16 import unavailable as frag_unavailable

    reason = frag_unavailable(device)
    if reason is not None:
        return reason
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _REASONS:
        try:
            self_check(torch.device("cuda", index))
            _REASONS[index] = None
        except Exception as err:  # noqa: BLE001 (a compile error, a wrong result)
            _REASONS[index] = f"dense self-check failed: {type(err).__name__}: {str(err)[:300]}"
    return _REASONS[index]
