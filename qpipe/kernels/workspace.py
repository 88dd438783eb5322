"""The split-K workspace every qpipe kernel shares: fp32 partial sums and int32 tickets.

A split-K launch stores each split's fp32 partial in its own slot [split, M, N]; the last
program of an output tile (a ticket counter) adds the slots in split order and resets its
counter, so the counters are all zero between launches and no memset runs. One workspace per
device: do not run two of these kernels concurrently on different streams of the same device.
Here, not in a kernel module: the Triton kernels and the CUDA fragment kernel both use it, and
the latter runs where Triton does not.
"""

from __future__ import annotations

import torch


class Workspace:
    """Per-device fp32 partial sums + int32 tickets, all zero between launches. Grown
    (re-allocated zeroed) when a larger problem comes along, which must not happen inside
    CUDA-graph capture: run a layer once before capturing it. A launcher that binds the
    buffers keeps the tensors it bound (a later growth must not free them under it)."""

    def __init__(self) -> None:
        self._bufs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(
        self, device: torch.device, n_acc: int, n_cnt: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ws, cnt = self._bufs.get(device, (None, None))
        if ws is None or ws.numel() < n_acc or cnt.numel() < n_cnt:
            ws_n = max(n_acc, 1 << 16, 0 if ws is None else 2 * ws.numel())
            cnt_n = max(n_cnt, 1 << 12, 0 if cnt is None else 2 * cnt.numel())
            ws = torch.zeros(ws_n, dtype=torch.float32, device=device)
            cnt = torch.zeros(cnt_n, dtype=torch.int32, device=device)
            self._bufs[device] = (ws, cnt)
        return ws, cnt

    def for_launch(
        self, device: torch.device, split_k: int, m: int, n: int, tiles: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers of one launch: [split_k, M, N] partial slots (none without a split)
        and a ticket per output tile."""
        return self.get(device, split_k * m * n if split_k > 1 else 1, tiles)


WORKSPACE = Workspace()
