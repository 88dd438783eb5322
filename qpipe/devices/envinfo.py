"""Facts about this machine: device, memory, driver, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Callable
from typing import Any

import psutil
import torch

LIBRARIES = (
    "torch",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "llmcompressor",
    "compressed-tensors",
    "triton",
    "hydra-core",
    "mlflow",
    "mlflow-skinny",
)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _nvml_handle(pynvml, device_index: int):
    """NVML's handle for torch's ``cuda:<device_index>``. NVML numbers every GPU of the
    machine and ignores CUDA_VISIBLE_DEVICES; a job pinned to physical GPU 1 sees it as
    cuda:0, so the GPU is found by its UUID."""
    try:
        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        for name in (uuid, f"GPU-{uuid}"):
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(name)
            except pynvml.NVMLError:
                continue
    except (AssertionError, RuntimeError, AttributeError):
        pass
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def _process_used_gb(pynvml, handle) -> float:
    pid = os.getpid()
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == pid and proc.usedGpuMemory is not None:
            return proc.usedGpuMemory / 1e9
    # In containers the driver may not see our pid; the device total is the next best view.
    return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 1e9


def nvml_process_used_gb(device_index: int = 0) -> float | None:
    """This process's GPU memory as the driver sees it (allocator + CUDA context), in GB."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return _process_used_gb(pynvml, _nvml_handle(pynvml, device_index))
    except Exception:  # NVML is optional: no driver, no library, no permission
        return None


def nvml_process_reader(device_index: int = 0) -> Callable[[], float | None] | None:
    """A cheap repeated ``nvml_process_used_gb`` (NVML initialised and the GPU found once),
    for sampling; None where NVML does not answer."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml, device_index)
        _process_used_gb(pynvml, handle)
    except Exception:  # NVML is optional
        return None

    def read() -> float | None:
        try:
            return _process_used_gb(pynvml, handle)
        except Exception:  # a driver hiccup: no sample this time
            return None

    return read


def device_facts(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "device": device,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "host_memory_gb": round(psutil.virtual_memory().total / 1e9, 2),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        facts.update(
            gpu_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gb=round(props.total_memory / 1e9, 2),
            multiprocessors=props.multi_processor_count,
            cuda_runtime=torch.version.cuda,
        )
        try:
            import pynvml

            pynvml.nvmlInit()
            facts["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            facts["driver"] = None
    return facts


def _warm_up_libraries(device: str) -> None:
    """Run once what every model run loads: cuBLAS (fp32 GEMM), cuBLASLt (a half-precision
    linear with bias), and the fused attention kernels (SDPA in bf16). Each loads its modules
    into the context and keeps a workspace for the process."""
    import torch.nn.functional as F

    x = torch.ones(64, 64, device=device)
    (x @ x).sum().item()
    for dtype in (torch.bfloat16, torch.float16):
        h = torch.ones(256, 256, device=device, dtype=dtype)
        F.linear(h, h, h[0]).sum().item()
        q = torch.ones(1, 2, 128, 64, device=device, dtype=dtype)
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()


def measure_cuda_context_gb(device: str) -> float | None:
    """What the process holds on the GPU for itself once CUDA and the libraries every run
    uses are up: the CUDA context with their modules (NVML beyond the allocator's segments)
    plus the workspaces they keep allocated (cuBLAS/cuBLASLt take theirs from the
    allocator, before any memory window starts). None where NVML does not answer."""
    if not device.startswith("cuda"):
        return 0.0
    _warm_up_libraries(device)
    torch.cuda.synchronize(device)
    used = nvml_process_used_gb(torch.device(device).index or 0)
    if used is None:
        return None
    cached_free = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(used - cached_free / 1e9, 0.0)
