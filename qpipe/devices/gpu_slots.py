"""One job per GPU in a ``--multirun``: each job process holds its own GPU(s) for as long as
it lives, and a job that finds none free waits (the queue).

Any Hydra launcher that runs jobs in processes works: the joblib launcher (loky workers that
run job after job), submitit's local executor (one process per job, all started at once) or a
SLURM allocation with several GPUs. A GPU is held through an exclusive ``flock`` on a file
named after its physical id; the kernel drops the lock when the process ends, however it ends,
so a killed job never leaves its GPU taken.

A process keeps the GPU it first took: a loky worker that ran a job on GPU 1 runs its next job
on GPU 1 too. That is what lets the pin be ``CUDA_VISIBLE_DEVICES`` (set before CUDA starts in
that process), so every library in the job sees exactly one GPU, as ``cuda:0``.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_HELD: Slot | None = None


@dataclass(frozen=True)
class Slot:
    gpus: tuple[str, ...]  # physical ids as CUDA_VISIBLE_DEVICES names them
    fd: int


def lock_dir() -> Path:
    """Machine-wide (every sweep on this machine shares the GPUs): ``$QPIPE_GPU_LOCKS`` or
    a folder in the system's temp directory."""
    path = Path(os.environ.get("QPIPE_GPU_LOCKS") or Path(tempfile.gettempdir()) / "qpipe-gpus")
    path.mkdir(parents=True, exist_ok=True)
    return path


def visible_gpus() -> list[str]:
    """The GPUs this process may use, without starting CUDA (a forked or spawned job must be
    free to narrow ``CUDA_VISIBLE_DEVICES`` after this)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no driver: no GPU
        return []


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def claim(gpus_per_job: int, poll_s: float = 0.5, timeout_s: float | None = None) -> Slot | None:
    """Hold ``gpus_per_job`` visible GPUs for this process (the same ones on every call), or
    None when there is nothing to share (no GPU, pinning off, or no more GPUs than a job
    needs). Slots are aligned groups (GPUs 0-1, 2-3, ...) so that two waiting jobs can never
    each hold half of what the other needs."""
    global _HELD
    if _HELD is not None:
        return _HELD
    gpus = visible_gpus()
    if gpus_per_job < 1 or len(gpus) <= gpus_per_job:
        return None
    groups = [
        tuple(gpus[i : i + gpus_per_job])
        for i in range(0, len(gpus) - gpus_per_job + 1, gpus_per_job)
    ]
    folder = lock_dir()
    start = time.monotonic()
    while True:
        for group in groups:
            fd = _try_lock(folder / f"gpu-{'-'.join(group)}.lock")
            if fd is not None:
                _HELD = Slot(gpus=group, fd=fd)
                return _HELD
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no free GPU slot among {groups} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def pin(slot: Slot) -> str:
    """Make ``slot`` this process's GPUs; returns the device the job should name. Before CUDA
    starts, ``CUDA_VISIBLE_DEVICES`` narrows what every library sees; after (a process that
    already used CUDA), only an explicit device index can still pick the GPU."""
    import torch

    if not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
        return "cuda"
    visible = visible_gpus()
    return f"cuda:{visible.index(slot.gpus[0])}"


def visible_gpu_count() -> int:
    """``${qpipe.visible_gpus:}``: how many GPUs this machine shows (0 without)."""
    return len(visible_gpus())


def parallel_jobs(gpus_per_job: int | str = 1) -> int:
    """How many jobs a launcher should run at once here: one per GPU slot, or 1 without GPUs
    (jobs on the CPU only compete for its cores). Used as ``${qpipe.parallel_jobs:...}``."""
    per_job = int(gpus_per_job)
    gpus = len(visible_gpus())
    if gpus == 0:
        return 1
    return max(gpus // per_job, 1) if per_job >= 1 else 1


def pin_job(cfg) -> dict[str, str]:
    """In a ``--multirun`` job: take this job's GPU slot (waiting for one if all are held),
    point ``cfg.device`` at it, and return the tags that record it."""
    from omegaconf import open_dict

    per_job = int(cfg.get("placement", {}).get("gpus_per_job", 1))
    if str(cfg.get("device", "auto")) == "cpu":
        return {}
    slot = claim(per_job)
    if slot is None:
        return {}
    device = pin(slot)
    if str(cfg.get("device", "auto")) in ("auto", "cuda"):
        with open_dict(cfg):
            cfg.device = device
    return {"qpipe.gpus": ",".join(slot.gpus)}
