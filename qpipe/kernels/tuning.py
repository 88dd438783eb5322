"""Choosing a launch configuration for the W4A16 kernels: heuristics plus a small autotuner.

The tuner times a handful of candidates (``triton.testing.do_bench``, median) the first time a
(kernel, M bucket, N, K, group size, dtype, zero points) key is seen, outside CUDA-graph
capture, and remembers the winner for the process (and in ``$QPIPE_TUNE_CACHE``, a JSON file,
when set). During capture, under the interpreter, or with ``QPIPE_AUTOTUNE=0`` the heuristic
configuration runs instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from qpipe.kernels.triton_w4a16 import KernelConfig, legal_block_k

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
            "gemv", block_n=bn, block_k=bk, split_k=_split_for(-(-n // bn) * m, k_tiles, sms, 4),
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
    """A small search space around the heuristic (a few tens of launches to time)."""
    base = heuristic(m, n, k, group_size, device)
    bk = base.block_k
    k_tiles = -(-k // bk)
    splits = sorted(
        {s for s in (base.split_k // 2, base.split_k, base.split_k * 2) if 1 <= s <= k_tiles}
    )
    out: list[KernelConfig] = []
    if base.kind == "gemv":
        for bn in (32, 64, 128):
            for split in splits:
                out.append(
                    KernelConfig("gemv", block_n=bn, block_k=bk, split_k=split, num_stages=1)
                )
    else:
        for bn in (64, 128):
            for stages in (3, 4):
                for split in splits:
                    warps = 8 if base.block_m * bn >= 128 * 128 else 4
                    out.append(
                        KernelConfig(
                            "mm",
                            block_m=base.block_m,
                            block_n=bn,
                            block_k=bk,
                            split_k=split,
                            num_warps=warps,
                            num_stages=stages,
                        )  # fmt: skip
                    )
    if base not in out:
        out.append(base)
    return out


class Tuner:
    """Remembers the fastest configuration per problem key."""

    def __init__(self) -> None:
        self.best: dict[str, KernelConfig] = {}
        self._path = os.environ.get("QPIPE_TUNE_CACHE")
        if self._path and Path(self._path).is_file():
            for key, cfg in json.loads(Path(self._path).read_text()).items():
                self.best[key] = KernelConfig(**cfg)

    @staticmethod
    def key(x: torch.Tensor, n: int, k: int, group_size: int, has_z: bool) -> str:
        dev = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
        return f"{dev}|m{m_bucket(x.shape[0])}|n{n}|k{k}|g{group_size}|{x.dtype}|z{int(has_z)}"

    def choose(
        self,
        x: torch.Tensor,
        n: int,
        k: int,
        group_size: int,
        has_z: bool,
        run: Callable[[KernelConfig], object],
    ) -> KernelConfig:
        key = self.key(x, n, k, group_size, has_z)
        if key in self.best:
            return self.best[key]
        m = x.shape[0]
        base = heuristic(m, n, k, group_size, x.device)
        can_time = (
            x.is_cuda
            and os.environ.get("QPIPE_AUTOTUNE", "1") != "0"
            and not torch.cuda.is_current_stream_capturing()
        )
        if not can_time:
            return base
        from triton.testing import do_bench

        timed = []
        for cfg in candidates(m, n, k, group_size, x.device):
            ms = do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20, return_mode="median")
            timed.append((ms, cfg))
        self.best[key] = min(timed, key=lambda t: t[0])[1]
        if self._path:
            data = {k_: c.as_dict() for k_, c in self.best.items()}
            Path(self._path).write_text(json.dumps(data, indent=1))
        return self.best[key]


TUNER = Tuner()
