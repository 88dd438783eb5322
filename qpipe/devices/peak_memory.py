"""Measuring a model spread over several GPUs: the torch allocator's peak per device and NVML's
view of this process per GPU, compared with each device's share of the budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qpipe.devices.envinfo import nvml_process_used_gb
from qpipe.errors import ConfigError


@dataclass
class GpuWindows:
    """Peak memory of every GPU a device map uses, between ``start()`` and ``stop()``; the
    same face as ``MemoryWindow`` (``used_gb`` is the sum over the GPUs)."""

    indices: list[int]
    peaks: dict[int, int] = field(default_factory=dict)
    reserved: dict[int, int] = field(default_factory=dict)
    nvml: dict[int, float | None] = field(default_factory=dict)
    on_gpu: bool = True

    @property
    def device(self) -> str:
        return f"cuda:{self.indices[0]}"

    def start(self) -> GpuWindows:
        for i in self.indices:
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)
        return self

    def stop(self) -> GpuWindows:
        return self.read()

    def close(self) -> None:
        return None  # nothing runs between reads

    def read(self) -> GpuWindows:
        for i in self.indices:
            torch.cuda.synchronize(i)
            self.peaks[i] = torch.cuda.max_memory_allocated(i)
            self.reserved[i] = torch.cuda.max_memory_reserved(i)
            self.nvml[i] = nvml_process_used_gb(i)
        return self

    def split_host_peak(self) -> None:
        return None  # GPU peaks need no phase split (see MemoryWindow.split_host_peak)

    @property
    def used_gb(self) -> float:
        return sum(self.peaks.values()) / 1e9

    @property
    def reserved_peak(self) -> int:
        return sum(self.reserved.values())

    @property
    def nvml_gb(self) -> float | None:
        values = [v for v in self.nvml.values() if v is not None]
        return sum(values) if values else None


def gpu_indices(placement: dict[str, Any]) -> list[int]:
    """The GPUs a budget's placement uses (those with a share of the estimate)."""
    return [int(d["device"].split(":")[1]) for d in placement["devices"] if d["device"] != "cpu"]


def per_device_metrics(window: GpuWindows, placement: dict[str, Any]) -> dict[str, float]:
    """Measured peak, NVML view and estimate error of each GPU, plus the host's offload."""
    metrics: dict[str, float] = {}
    est_sum = 0.0
    for dev in placement["devices"]:
        if dev["device"] == "cpu":
            continue
        index = int(dev["device"].split(":")[1])
        key = f"cuda{index}"
        measured = window.peaks.get(index, 0) / 1e9
        est_sum += dev["peak_gb"]
        metrics[f"mem.{key}.measured_peak_gb"] = measured
        if measured > 0:
            metrics[f"mem.{key}.est_error_pct"] = (dev["peak_gb"] - measured) / measured * 100
        nvml = window.nvml.get(index)
        if nvml is not None:
            metrics[f"mem.{key}.nvml_process_gb"] = nvml
            metrics[f"mem.{key}.est_total_error_pct"] = (dev["total_gb"] - nvml) / nvml * 100
    metrics["mem.est_gpu_peak_gb"] = est_sum
    return metrics


def offloaded_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights accelerate streams in for offloaded modules: their parameters sit
    on the meta device (shape and dtype kept) while the hook's weights map holds the data."""
    offloaded = {
        name
        for name, module in model.named_modules()
        if getattr(getattr(module, "_hf_hook", None), "offload", False)
    }
    total = 0
    for name, param in model.named_parameters():  # shared parameters once
        owner = name.rpartition(".")[0]
        if param.device.type == "meta" and owner in offloaded:
            total += param.numel() * param.element_size()
    return total


def device_map_for(
    placement: dict[str, Any] | None, device: str
) -> tuple[dict[str, int | str] | None, str, GpuWindows | None]:
    """The budget's device map in torch's numbering, the main device, and a window over its
    GPUs; (None, device, None) when the model sits on one device. Card k of the plan is GPU
    ``base + k``, where ``base`` is the index of ``device`` (a job pinned to cuda:1 plans its
    one card as card 0)."""
    if not placement:
        return None, device, None
    base = (torch.device(device).index or 0) if device.startswith("cuda") else 0
    mapped: dict[str, int | str] = {}
    for name, where in placement["device_map"].items():
        mapped[name] = base + int(where.split(":")[1]) if where.startswith("cuda") else where
    indices = sorted({base + i for i in gpu_indices(placement)})
    available = torch.cuda.device_count()
    if indices and indices[-1] >= available:
        raise ConfigError(
            f"the memory budget spreads the model over cuda:{indices[0]}..cuda:{indices[-1]} "
            f"but this process sees {available} GPU(s); set hardware.count={max(available, 1)} "
            "or run where the GPUs are (pipeline=estimate plans any hardware offline)"
        )
    main = placement["main_device"]
    main = f"cuda:{base + int(main.split(':')[1])}" if main.startswith("cuda") else main
    return mapped, main, GpuWindows(indices)


def loaded_weights_metrics(model: torch.nn.Module) -> dict[str, float]:
    """``mem.loaded_weights_gb`` (every weight, wherever it sits) and, when some sit in host
    memory behind accelerate's offload hooks, ``mem.host_offloaded_gb``."""
    from qpipe.devices.measure import tensor_bytes

    try:
        offloaded = offloaded_bytes(model)
    except Exception:  # accelerate internals: a metric must never fail a load
        offloaded = 0
    metrics = {"mem.loaded_weights_gb": (tensor_bytes(model) + offloaded) / 1e9}
    if offloaded:
        metrics["mem.host_offloaded_gb"] = offloaded / 1e9
    return metrics
