"""Choosing a launch configuration for the W4A16 kernels: heuristics plus a small autotuner.

The tuner times a handful of candidates (CUDA graphs over weight copies, median) the first time
a (device, M bucket, N, K, group size, dtype, zero points, weight form) key is seen, outside
CUDA-graph capture, and remembers the winner for the process and on disk: in
``outputs/cache/kernel_tuning/w4a16-<fingerprint>.json``, shared by the next runs and by every
job of a sweep. The fingerprint hashes the kernels' and the tuner's source and the torch and
Triton versions, so a changed kernel or library never reuses a stale choice; the device name
and the shapes are in each entry's key. ``QPIPE_TUNE_CACHE=<file>`` names another file;
``QPIPE_TUNE_CACHE=off`` keeps choices in the process only. During capture, under the
interpreter, or with ``QPIPE_AUTOTUNE=0`` the heuristic configuration runs instead.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qpipe.kernels.triton_w4a16 import KernelConfig, launch, legal_block_k, weight_dims
from qpipe.store.paths import outputs_root
from qpipe.store.records import read_json, update_json

# M at or below this runs the split-K GEMV (CUDA cores); above it, the tensor-core kernel.
GEMV_MAX_M = 4


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def m_bucket(m: int) -> int:
    return m if m <= GEMV_MAX_M else _pow2_at_least(m)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(tiles: int, k_tiles: int, sms: int, waves: float) -> int:
    """Smallest power-of-two split that gives about ``waves`` programs per SM."""
    split = 1
    while tiles * split < waves * sms and split * 2 <= max(1, k_tiles // 2):
        split *= 2
    return split


def heuristic(m: int, n: int, k: int, group_size: int, device: torch.device) -> KernelConfig:
    sms = _num_sms(device)
    bk = legal_block_k(group_size, 128)
    k_tiles = -(-k // bk)
    if m <= GEMV_MAX_M:
        bn = 64
        return KernelConfig(
            "gemv", block_n=bn, block_k=bk, split_k=_split_for(-(-n // bn), k_tiles, sms, 4),
            num_warps=4, num_stages=1,
        )  # fmt: skip
    bm = min(64, max(16, _pow2_at_least(m))) if m <= 64 else 128
    bn = 64 if m <= 32 else 128
    tiles = -(-n // bn) * -(-m // bm)
    return KernelConfig(
        "mm", block_m=bm, block_n=bn, block_k=bk, split_k=_split_for(tiles, k_tiles, sms, 2),
        num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3,
    )  # fmt: skip


def candidates(m: int, n: int, k: int, group_size: int, device: torch.device) -> list[KernelConfig]:
    """A small search space around the heuristic: tile widths x warps x the splits that give
    between one and sixteen programs per SM, x the GEMV's prefetch depth (a few tens of
    CUDA-graph timings, a few seconds per new layer shape, most of it compiling)."""
    base = heuristic(m, n, k, group_size, device)
    sms = _num_sms(device)
    bk = base.block_k
    k_tiles = -(-k // bk)

    def splits(bn: int, m_tiles: int) -> list[int]:
        tiles = -(-n // bn) * m_tiles
        ok = [s for s in (1, 2, 4, 8, 16, 32) if s <= k_tiles and sms <= tiles * s <= 16 * sms]
        return ok or [_split_for(tiles, k_tiles, sms, 2)]

    out: list[KernelConfig] = []
    if base.kind == "gemv":
        for bn, warps in ((16, 1), (16, 2), (32, 1), (32, 2), (32, 4), (64, 2), (64, 4),
                          (128, 2), (128, 4)):  # fmt: skip
            for split in splits(bn, 1):
                # a third tile in flight only where the tiles are small (registers)
                for prefetch in (2, 3) if bn * warps <= 128 else (2,):
                    out.append(
                        KernelConfig("gemv", block_n=bn, block_k=bk, split_k=split,
                                     num_warps=warps, num_stages=1, prefetch=prefetch)
                    )  # fmt: skip
    if base.kind == "mm" or m > 1:  # small M > 1: the tensor-core kernel may win too
        bm = base.block_m if base.kind == "mm" else 16
        for bn, warps in ((64, 4), (128, 4), (128, 8)):
            for stages in (3, 4):
                for split in splits(bn, -(-m // bm)):
                    out.append(
                        KernelConfig("mm", block_m=bm, block_n=bn, block_k=bk,
                                     split_k=split, num_warps=warps, num_stages=stages)
                    )  # fmt: skip
    # The plane kernel (BLOCK_K / 8 words must fill a dot's K of 16) has passed the interpreter
    # tests only: it stays out of the tuner until a GPU run checks it (QPIPE_MMP=1 opts in).
    if m > 1 and bk == 128 and os.environ.get("QPIPE_MMP", "0") == "1":
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        for bn, warps in ((64, 4), (128, 4), (128, 8)):
            for stages in (2, 3):
                for split in splits(bn, -(-m // bm)):
                    out.append(
                        KernelConfig("mmp", block_m=bm, block_n=bn, block_k=bk,
                                     split_k=split, num_warps=warps, num_stages=stages)
                    )  # fmt: skip
    if base not in out:
        out.append(base)
    return out


def _launch_any(x, qweight, scales, zeros, group_size, bias, cfg, out=None) -> torch.Tensor:
    """One launch with an explicit configuration: the fragment kernel's, a Triton W4, W8 or
    FP8 one's."""
    if qweight.dtype == torch.float8_e4m3fn:  # Fp8Linear's e4m3 weights, fp32 channel scales
        from qpipe.kernels.triton_fp8 import e4m3_gemv

        return e4m3_gemv(x, qweight, scales, bias, cfg, out=out)
    if qweight.dtype == torch.uint8:  # 8-bit weights (Int8Linear)
        from qpipe.kernels.triton_w8a16 import launch as w8_launch

        return w8_launch(x, qweight, scales, zeros, group_size, bias, cfg, out=out)
    if cfg.kind == "frag":
        from qpipe.kernels.frag_w4a16 import launch as frag_launch

        return frag_launch(x, qweight, scales, zeros, group_size, bias, cfg, out=out)
    if cfg.kind == "dense":  # fragment-order weights at large M: dequantize + cuBLAS
        from qpipe.kernels.frag_dense import launch as dense_launch

        return dense_launch(x, qweight, scales, zeros, group_size, bias, cfg, out=out)
    return launch(x, qweight, scales, zeros, group_size, bias, cfg, out=out)


def _time_cold(
    x: torch.Tensor,
    copies: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    group_size: int,
    bias: torch.Tensor | None,
    cfg,
    replays: int = 10,
) -> tuple[float, torch.Tensor]:
    """(µs per call, the output): a CUDA graph calls the kernel once per weight copy (together
    larger than the L2, so weights stream from HBM as in a real decoder), median over replays."""
    qweight, scales = copies[0][0], copies[0][1]
    # N: the 4-bit scales are [G, N], the 8-bit ones [N, G] (and their weights [N, K] bytes)
    # and FP8's [N, K] e4m3 bytes with [N] scales)
    n = scales.shape[1] if qweight.dtype == torch.int32 else qweight.shape[0]
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _launch_any(x, *copies[0], group_size, bias, cfg, out=y)  # compile, size the workspace
    torch.cuda.synchronize()
    first = y.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in copies:
            _launch_any(x, *c, group_size, bias, cfg, out=y)
    graph.replay()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(replays)
    ]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2] * 1000.0 / len(copies), first


def cold_copy_count(nbytes: int, l2_bytes: int) -> int:
    """How many copies of a layer's weights (the original among them) the tuner times
    across: together about three L2s, so weights stream from HBM as in a real decoder."""
    return max(1, min(32, -(-3 * l2_bytes // max(nbytes, 1))))


def tuning_transient_bytes(layer_bytes: list[int], l2_bytes: int) -> int:
    """The most the tuner holds beside the model at once: the extra copies of one layer
    (the memory estimate carries it for a process that has not tuned these shapes yet)."""
    return max(((cold_copy_count(b, l2_bytes) - 1) * b for b in layer_bytes), default=0)


def _cold_copies(qweight, scales, zeros) -> list:
    """Enough copies of the weights to outrun the L2 (the originals first)."""
    nbytes = qweight.numel() * qweight.element_size() + scales.numel() * scales.element_size()
    l2 = getattr(torch.cuda.get_device_properties(qweight.device), "L2_cache_size", 50 << 20)
    n = cold_copy_count(nbytes, l2)
    extra = [
        (qweight.clone(), scales.clone(), None if zeros is None else zeros.clone())
        for _ in range(n - 1)
    ]
    return [(qweight, scales, zeros), *extra]


@functools.cache
def _device_name(device: torch.device) -> str:
    # Asked on every eager call: the driver query behind it costs more than a decode GEMV.
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


# What a tuning choice depends on besides its key: these files' code and the libraries.
# the kernels whose launch configurations are stored, and what decides them
_FINGERPRINTED = (
    "triton_w4a16.py", "triton_w8a16.py", "triton_fp8.py", "frag_w4a16.py", "w4_frag.cu", "layout.py",
    "tuning.py", "formats.py", "frag_dense.py",
)  # fmt: skip
TUNING_KIND = "kernel_tuning"  # the folder under outputs/cache


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.cache
def fingerprint() -> str:
    """A hash of what makes a stored choice valid: the kernel and tuner source, torch (and its
    CUDA) and Triton versions. A changed kernel gets a new file, never a stale entry."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in _FINGERPRINTED:
        digest.update(name.encode() + (here / name).read_bytes())
    digest.update(f"torch {torch.__version__} cuda {torch.version.cuda}".encode())
    digest.update(f"triton {_version('triton')}".encode())
    return digest.hexdigest()[:16]


def tuning_file() -> Path | None:
    """Where the tuner keeps its choices (None: in the process only)."""
    named = os.environ.get("QPIPE_TUNE_CACHE")
    if named == "off":
        return None
    if named:
        return Path(named)
    return outputs_root() / "cache" / TUNING_KIND / f"w4a16-{fingerprint()}.json"


@dataclass
class TuningStats:
    """What the tuner did in this process (cumulative: stages take differences)."""

    tuned: int = 0  # keys timed here
    from_disk: int = 0  # keys answered by a choice an earlier process stored
    seconds: float = 0.0  # spent compiling and timing candidates


class Tuner:
    """Remembers the fastest configuration per problem key, in the process and on disk."""

    def __init__(self) -> None:
        self.best: dict[str, KernelConfig] = {}
        self.skipped: list[str] = []  # candidates that failed to compile or run, and why
        self.stats = TuningStats()
        self._stored: set[str] = set()  # keys read from disk, not yet asked for
        self._loaded_from: Path | None = None

    def _ensure_loaded(self) -> None:
        """Read the stored choices (once per file: tests and runs may move the outputs)."""
        path = tuning_file()
        if path is None or path == self._loaded_from:
            return
        self._loaded_from = path
        for key, cfg in read_json(path).items():
            if key in self.best:
                continue
            try:
                self.best[key] = _config_of(cfg)
            except TypeError:  # an entry this version's configurations cannot hold: tune again
                continue
            self._stored.add(key)

    def _save(self, key: str) -> None:
        path = tuning_file()
        if path is None:
            return
        choice = self.best[key].as_dict()
        update_json(path, lambda stored: {**stored, key: choice})

    def _known(self, key: str):
        """The stored or chosen configuration of ``key`` (None: it must be tuned)."""
        if key not in self.best:
            self._ensure_loaded()
        if key not in self.best:
            return None
        if key in self._stored:
            self._stored.discard(key)
            self.stats.from_disk += 1
        return self.best[key]

    def has_tuned(self, n: int, k: int) -> bool:
        """Whether a configuration for an [n, k] weight on this process's GPU is chosen
        already (in this process, or stored by an earlier one): then no tuning copies."""
        self._ensure_loaded()
        device = _device_name(torch.device("cuda")) if torch.cuda.is_available() else None
        return any(
            f"|n{n}|k{k}|" in key and (device is None or key.startswith(f"{device}|"))
            for key in self.best
        )

    @staticmethod
    def key(
        x: torch.Tensor, n: int, k: int, group_size: int, has_z: bool, form: str | bool = "rows"
    ) -> str:
        """``form``: the qweight's form (layout.form_of; True/False: tiled or not)."""
        dev = _device_name(x.device)
        key = f"{dev}|m{m_bucket(x.shape[0])}|n{n}|k{k}|g{group_size}|{x.dtype}|z{int(has_z)}"
        if form is True or form is False:
            form = "tiled" if form else "rows"
        return key + ("" if form == "rows" else f"|{form}")  # the forms time differently

    def choose(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        group_size: int,
        bias: torch.Tensor | None,
    ):
        """The 4-bit launch configuration for this call (timed once per key)."""
        m, k = x.shape
        if qweight.dim() == 3:  # the fragment order: only the fragment kernel reads it
            from qpipe.kernels import frag_w4a16

            n, _ = frag_w4a16.frag_dims(qweight, scales)
            key = self.key(x, n, k, group_size, zeros is not None, "frag")
            known = self._known(key)
            if known is not None:
                return known
            from qpipe.kernels.frag_dense import unavailable as dense_unavailable

            dense = x.is_cuda and dense_unavailable(x.device) is None
            base = frag_heuristic(m, n, k, x.device, dense)
            space = lambda: frag_candidates(m, n, k, x.device, dense)  # noqa: E731
        else:
            n, _, tiled = weight_dims(qweight, scales)
            key = self.key(x, n, k, group_size, zeros is not None, tiled)
            known = self._known(key)
            if known is not None:
                return known
            base = heuristic(m, n, k, group_size, x.device)
            space = lambda: candidates(m, n, k, group_size, x.device)  # noqa: E731
        return self._tune(key, base, space, x, qweight, scales, zeros, group_size, bias)

    def choose_w8(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        group_size: int,
        bias: torch.Tensor | None,
    ):
        """The 8-bit launch configuration (GEMV or tensor cores) for this call."""
        from qpipe.kernels import triton_w8a16 as w8

        m, k = x.shape
        n = qweight.shape[0]
        key = "w8|" + self.key(x, n, k, group_size, zeros is not None)
        known = self._known(key)
        if known is not None:
            return known
        base = w8.heuristic(m, n, k, group_size, x.device)
        space = lambda: w8.candidates(m, n, k, group_size, x.device)  # noqa: E731
        return self._tune(key, base, space, x, qweight, scales, zeros, group_size, bias)

    def choose_fp8(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ):
        """The FP8 GEMV's launch configuration (M <= 4) for this call."""
        from qpipe.kernels import triton_fp8

        m, k = x.shape
        n = weight.shape[0]
        key = "e4m3|" + self.key(x, n, k, 0, False)
        known = self._known(key)
        if known is not None:
            return known
        base = triton_fp8.heuristic(m, n, k, x.device)
        space = lambda: triton_fp8.candidates(m, n, k, x.device)  # noqa: E731
        return self._tune(key, base, space, x, weight, scale, None, 0, bias)

    def _tune(self, key, base, space, x, qweight, scales, zeros, group_size, bias):
        can_time = (
            x.is_cuda
            and os.environ.get("QPIPE_AUTOTUNE", "1") != "0"
            and not torch.cuda.is_current_stream_capturing()
        )
        if not can_time:
            return base
        started = time.perf_counter()
        copies = _cold_copies(qweight, scales, zeros)
        timed = []
        first = None  # every candidate must compute what the first one did
        for cfg in space():
            try:
                us, y = _time_cold(x, copies, group_size, bias, cfg)
            except Exception as err:  # noqa: BLE001 (e.g. out of shared memory on this GPU)
                self.skipped.append(f"{key} {cfg}: {type(err).__name__}: {err}"[:300])
                continue
            if first is None:
                first = y.float()
            err = float((y.float() - first).norm() / first.norm().clamp_min(1e-30))
            if not err < 1e-2:
                self.skipped.append(f"{key} {cfg}: differs from the first candidate by {err:.3g}")
                continue
            timed.append((us, cfg))
        del copies
        # the heuristic configuration is the fallback when no candidate could be timed
        self.best[key] = min(timed, key=lambda t: t[0])[1] if timed else base
        self.stats.tuned += 1
        self.stats.seconds += time.perf_counter() - started
        if timed:  # a fallback is no measurement: the next process tries again
            self._save(key)
        return self.best[key]


TUNER = Tuner()


def frag_heuristic(m: int, n: int, k: int, device: torch.device, dense: bool = True):
    """The untimed choice for fragment-order weights: the fragment kernel, or from
    ``frag_dense.DENSE_MIN_M`` rows on the dense path (dequantize + cuBLAS) where it runs
    (``dense``: ``frag_dense.unavailable`` is None)."""
    from qpipe.kernels import frag_dense, frag_w4a16

    if dense and m >= frag_dense.DENSE_MIN_M:
        return frag_dense.heuristic(m, n, k)
    return frag_w4a16.heuristic(m, n, k, device)


def frag_candidates(m: int, n: int, k: int, device: torch.device, dense: bool = True) -> list:
    """What the tuner times for fragment-order weights: the fragment kernel's configurations
    and, from ``frag_dense.TUNE_MIN_M`` rows on where it runs, the dense path's chunk sizes;
    the heuristic's choice among them."""
    from qpipe.kernels import frag_dense, frag_w4a16

    out = frag_w4a16.candidates(m, n, k, device)
    if dense:
        out += frag_dense.candidates(m, n, k)
    base = frag_heuristic(m, n, k, device, dense)
    return out if base in out else [*out, base]


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    cfg: KernelConfig | None = None,
) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x fp16/bf16 [M, K] (kernel column order) and W in the
    qpipe-w4 layout (any form); the configuration comes from the autotuner unless given."""
    if qweight.dim() == 3 and not _frag_runs(x):
        # fragment-order weights where the fragment kernel does not run (a compiled graph
        # that skipped QuantLinear's eager first call, the CPU interpreter): tiled per call
        from qpipe.kernels.layout import to_form

        qweight = to_form(qweight, scales.shape[1], "tiled")
        cfg = None if cfg is not None and cfg.kind in ("frag", "dense") else cfg
    if cfg is None:
        cfg = TUNER.choose(x, qweight, scales, zeros, group_size, bias)
    return _launch_any(x, qweight, scales, zeros, group_size, bias, cfg)


def _frag_runs(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    from qpipe.kernels.frag_w4a16 import unavailable

    return unavailable(x.device) is None


def w8a16_tuned(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The 8-bit matmul (``triton_w8a16``) with the tuner's configuration for this shape."""
    from qpipe.kernels.triton_w8a16 import launch as w8_launch
    from qpipe.kernels.triton_w8a16 import w8a16_matmul

    if not x.is_cuda:  # the interpreter: the heuristic, with w8a16_matmul's checks
        return w8a16_matmul(x, qweight, scales, zeros, group_size, bias)
    cfg = TUNER.choose_w8(x, qweight, scales, zeros, group_size, bias)
    return w8_launch(x, qweight, scales, zeros, group_size, bias, cfg)


def e4m3_gemv_tuned(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The FP8 GEMV (``triton_fp8``) with the tuner's configuration for this shape."""
    from qpipe.kernels.triton_fp8 import e4m3_gemv

    if not x.is_cuda:  # the interpreter: the heuristic
        return e4m3_gemv(x, weight, scale, bias)
    return e4m3_gemv(x, weight, scale, bias, TUNER.choose_fp8(x, weight, scale, bias))


def _config_of(cfg: dict):
    """A remembered configuration (JSON) as its class."""
    if cfg.get("kind") == "e4m3_gemv":
        from qpipe.kernels.triton_fp8 import Fp8GemvConfig

        return Fp8GemvConfig(**cfg)
    if "block_m" in cfg and "prefetch" not in cfg:
        from qpipe.kernels.triton_w8a16 import W8Config

        return W8Config(**cfg)
    if cfg.get("kind") == "frag":
        from qpipe.kernels.frag_w4a16 import FragConfig

        return FragConfig(**cfg)
    if cfg.get("kind") == "dense":
        from qpipe.kernels.frag_dense import DenseConfig

        return DenseConfig(**cfg)
    return KernelConfig(**cfg)
