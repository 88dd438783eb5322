"""The memory budget's per-device part: one card, or a device map over several (and host
memory), with a verdict per card, and where llm-compressor will quantize (the whole model on
the GPU, or layer by layer from host memory). memory_budget calls ``plan_devices`` and
``quantize_on_gpu``; ``load`` and validate_vram read what they return from the budget's
outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from omegaconf import DictConfig

from qpipe.devices.hardware import Cards, resolve_cards
from qpipe.memory import Estimate
from qpipe.memory.budget_inputs import BudgetInputs
from qpipe.memory.onload import CalibrationMemory, quantize_onload
from qpipe.memory.placement import Placement, meta_model, plan_placement


@dataclass
class DeviceVerdict:
    cards: Cards
    placement: Placement | None  # None: the whole model on one card, as before
    usable_gb: float  # what the single card may hold (cap and headroom applied)
    fits: bool

    def outputs(self) -> dict[str, Any]:
        return {"placement": self.placement.as_dict() if self.placement else None}

    def verdict(self, single: Estimate, hardware: str, device: str) -> str:
        """One line: does it fit, and on what."""
        of = f" (of {self.cards.count})" if self.cards.count > 1 else ""
        if self.placement is None:
            word = "fits" if self.fits else "does NOT fit"
            where = "in host memory" if device == "cpu" else f"on one {hardware} card{of}"
            reserve = f" + allocator reserve {single.reserve_gb:.2f}" if single.reserve_gb else ""
            parts = f" (peak {single.peak_gb:.2f}{reserve} + runtime {single.runtime_gb:.2f})"
            parts = parts if single.runtime_gb > 0 or single.reserve_gb > 0 else ""
            return (
                f"{word} {where}: {single.total_gb:.2f} GB estimated{parts} "
                f"of {self.usable_gb:.2f} usable"
            )
        gpus = self.placement.gpus
        used = [d for d in gpus if d.weights_gb > 0]
        where = f"{len(used)} × {hardware}"
        if self.placement.offloaded_gb > 0:
            where += f" + {self.placement.offloaded_gb:.2f} GB offloaded to host memory"
        word = "fits" if self.fits else "does NOT fit"
        per = ", ".join(f"{d.device} {d.total_gb:.2f}/{d.usable_gb:.2f} GB" for d in gpus)
        spill = self.placement.spilled_gb
        rest = f"; {spill:.2f} GB of weights have no room" if spill > 0 else ""
        return f"{word} on {where} ({self.placement.strategy}: {per}){rest}"

    def metrics(self) -> dict[str, float]:
        if self.placement is None:
            return {}
        out: dict[str, float] = {"mem.est_offload_gb": self.placement.offloaded_gb}
        for dev in self.placement.gpus:
            key = dev.device.replace(":", "")
            out[f"mem.{key}.est_peak_gb"] = dev.peak_gb
            out[f"mem.{key}.est_total_gb"] = dev.total_gb
            out[f"mem.{key}.est_weights_gb"] = dev.weights_gb
            out[f"mem.{key}.usable_gb"] = dev.usable_gb
        out["mem.est_gpu_peak_gb"] = sum(d.peak_gb for d in self.placement.gpus)
        return out

    def problem(self, model: str) -> str | None:
        """Why the plan does not fit, per card (None when it does)."""
        if self.placement is None or self.fits:
            return None
        parts = [
            f"{d.device} needs {d.total_gb:.2f} GB of {d.usable_gb:.2f} usable"
            for d in self.placement.devices
            if not d.fits
        ]
        if not any(isinstance(d, int) for d in self.placement.device_map.values()):
            parts.append("no GPU has room for the first module once its share is set aside")
        if "disk" in self.placement.device_map.values():
            parts.append(
                f"{self.placement.spilled_gb:.2f} GB of weights have no room on the GPUs "
                f"(or in hardware.offload_gb={cards_offload(self.placement):g}); add cards, "
                "raise hardware.offload_gb or quantize"
            )
        return f"{model} does not fit its device map: " + "; ".join(parts)


def cards_offload(placement: Placement) -> float:
    return next((d.capacity_gb for d in placement.devices if d.device == "cpu"), 0.0)


def _wants_map(strategy: str, cards: Cards, single: Estimate, usable0: float) -> bool:
    if strategy == "single" or cards.count == 0:
        return False
    if strategy != "auto":
        return True
    return cards.several and single.total_gb > usable0


def plan_devices(cfg: DictConfig, single: Estimate, inputs: BudgetInputs) -> DeviceVerdict:
    """One card when the model fits it (or ``placement.device_map=single``); otherwise
    accelerate's split over the hardware's cards with host offload, priced per device.
    ``single``: the chosen option's estimate on one card."""
    cards = resolve_cards(cfg, inputs.device, inputs.capacity_gb)
    usable0 = cards.usable_gb[0] if cards.count else 0.0
    strategy = str((cfg.get("placement") or {}).get("device_map", "auto"))
    on_gpu = inputs.device.startswith("cuda")
    if not on_gpu or not _wants_map(strategy, cards, single, usable0):
        return DeviceVerdict(cards, None, usable0, single.total_gb <= usable0)
    model = meta_model(inputs.model_config, inputs.model_class)
    placement = plan_placement(
        model,
        inputs.inventory,
        inputs.rules(),
        inputs.weight_format,
        inputs.dims,
        inputs.workload,
        inputs.dtype_bytes,
        usable_gb=cards.usable_gb,
        capacity_gb=cards.capacity_gb,
        runtime_gb=single.runtime_gb,
        offload_gb=cards.offload_gb,
        strategy="balanced" if strategy == "auto" else strategy,
    )
    return DeviceVerdict(cards, placement, usable0, placement.fits)


def device_table(placement: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows (device, weights, peak, usable, verdict) of a placement as the budget logged it."""
    rows = []
    for dev in placement["devices"]:
        gpu = dev["device"].startswith("cuda")
        rows.append(
            (
                dev["device"] + ("" if gpu else " (offload)"),
                f"{dev['weights_gb']:.2f}",
                f"{dev['total_gb']:.2f}" if gpu else "—",
                f"{dev['usable_gb']:.2f}",
                "fits" if dev["fits"] else "DOES NOT FIT",
            )
        )
    return rows


class GpuQuantizing(NamedTuple):
    """How llm-compressor will quantize on the GPU: ``outputs`` (None when it does not run
    there), its metrics, and why it cannot (None when it can)."""

    outputs: dict[str, Any] | None
    metrics: dict[str, float]
    problem: str | None


def quantize_on_gpu(
    cfg: DictConfig,
    inputs: BudgetInputs,
    full_precision: Estimate,
    usable_gb: float,
    calibrates: bool,
    calibration: CalibrationMemory,
) -> GpuQuantizing:
    """Where llm-compressor rounds ``inputs.quant``: the whole model on the card when it fits
    there, else layer by layer from host memory. ``full_precision``: the estimate of the
    unquantized model (what llm-compressor loads before it rounds); ``calibrates``: the method
    runs calibration samples through each layer, keeping ``calibration`` meanwhile (its
    backend says both)."""
    quant = inputs.quant
    if not inputs.device.startswith("cuda"):
        return GpuQuantizing(None, {}, None)
    calib = cfg.get("calib") or {}
    samples = int(calib.get("num_samples", 32)) if calibrates else 1
    seq_len = int(calib.get("seq_len", 256)) if calibrates else 1
    onload = quantize_onload(
        inputs.inventory,
        inputs.rules(),
        calibration,
        inputs.dims,
        samples,
        seq_len,
        inputs.dtype_bytes,
        full_precision.runtime_gb,
    )
    working = onload.total_gb - onload.subgraph_weights_gb - onload.runtime_gb
    whole = full_precision.weights_gb + working + full_precision.runtime_gb
    layer_by_layer = whole > usable_gb
    need = onload.total_gb if layer_by_layer else whole
    outputs = {
        "layer_by_layer": layer_by_layer,
        "gpu_gb": need,
        "whole_model_gb": whole,
        "onload": onload.as_dict(),
        "how": (
            f"layer by layer (llm-compressor sequential onloading, the model in host memory): "
            f"{need:.2f} GB on the GPU — the largest subgraph ({onload.largest_subgraph}, "
            f"{onload.subgraph_weights_gb:.2f} GB) + Hessians {onload.hessians_gb:.2f} + "
            f"activations {onload.activations_gb + onload.cached_outputs_gb:.2f} + runtime "
            f"{onload.runtime_gb:.2f}"
            if layer_by_layer
            else f"the whole model on the GPU: {need:.2f} GB"
        ),
    }
    metrics = {"mem.est_quantize_gpu_gb": need, "mem.est_quantize_onload_gb": onload.total_gb}
    problem = None
    if need > usable_gb:
        problem = (
            f"quantizing {cfg.model.name} with quant={quant.get('name')} needs {need:.2f} GB on "
            f"the GPU even layer by layer, but {usable_gb:.2f} GB are usable"
        )
    return GpuQuantizing(outputs, metrics, problem)
