"""Facts about this machine: device, memory, driver, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
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


def nvml_process_used_gb(device_index: int = 0) -> float | None:
    """This process's GPU memory as the driver sees it (allocator + CUDA context), in GB."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml, device_index)
        pid = os.getpid()
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return proc.usedGpuMemory / 1e9
        # In containers the driver may not see our pid; the device total is the next best view.
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 1e9
    except Exception:  # NVML is optional: no driver, no library, no permission
        return None


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


def measure_cuda_context_gb(device: str) -> float | None:
    """What the process holds on the GPU beyond the allocator once CUDA and cuBLAS are up."""
    if not device.startswith("cuda"):
        return 0.0
    x = torch.ones(64, 64, device=device)
    (x @ x).sum().item()  # initialise cuBLAS: its workspace is part of every real run
    used = nvml_process_used_gb(torch.device(device).index or 0)
    if used is None:
        return None
    return max(used - torch.cuda.memory_reserved(device) / 1e9, 0.0)
