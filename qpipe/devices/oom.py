"""Out-of-memory in a stage: one line with what was requested, what was free and what the
budget estimated, and the memory given back so that the next job of a sweep can run."""

from __future__ import annotations

import gc
import re
import traceback
from typing import Any

import torch

_REQUESTED = re.compile(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)")
_FREE = re.compile(r"of which ([\d.]+ ?[KMGT]?i?B) is free")
_TOTAL = re.compile(r"total capacity of ([\d.]+ ?[KMGT]?i?B)")


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or a library's RuntimeError saying the same (CUDA or host)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "not enough memory" in text or "can't allocate memory" in text
    )


def _allocated_gb() -> float | None:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.memory_allocated() / 1e9


def release_memory(err: BaseException, holders: list[dict[str, Any]]) -> float | None:
    """Drop what keeps the failed stage's tensors alive: the frames of the traceback and the
    live objects (models) handed between stages; return the GB the allocator still holds."""
    if err.__traceback__ is not None:
        traceback.clear_frames(err.__traceback__)
    for objects in holders:
        objects.clear()
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return _allocated_gb()


def describe(err: BaseException, stage: str, estimate: dict[str, Any] | None) -> str:
    """``CUDA out of memory in load: requested 2.00 GiB, 1.23 GiB free of 79.19 GiB; the
    budget estimated a peak of 16.87 GB (weights 16.38 GB)``."""
    text = str(err)
    where = "CUDA" if "cuda" in text.lower() or isinstance(err, torch.OutOfMemoryError) else "host"
    parts = []
    if match := _REQUESTED.search(text):
        parts.append(f"requested {match.group(1)}")
    free = _FREE.search(text)
    total = _TOTAL.search(text)
    if free:
        parts.append(f"{free.group(1)} free" + (f" of {total.group(1)}" if total else ""))
    elif where == "CUDA" and torch.cuda.is_available():
        free_b, total_b = torch.cuda.mem_get_info()
        parts.append(f"{free_b / 2**30:.2f} GiB free of {total_b / 2**30:.2f} GiB")
    if estimate:
        parts.append(
            f"the budget estimated a peak of {estimate.get('peak_gb', float('nan')):.2f} GB "
            f"(weights {estimate.get('weights_gb', float('nan')):.2f} GB)"
        )
    else:
        parts.append("no budget estimate was made (memory_budget did not run)")
    return f"{where} out of memory in {stage}: " + "; ".join(parts)
