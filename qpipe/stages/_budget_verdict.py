"""memory_budget's verdict: does the chosen option fit its devices (and can llm-compressor
quantize it there), the one-line answer, the numbers logged, and the stop that ends the
pipeline early with the reason when it does not."""

from __future__ import annotations

from typing import Any

from qpipe.backends import get_backend, quant_options
from qpipe.devices.budget import DeviceVerdict, GpuQuantizing
from qpipe.memory import Estimate
from qpipe.memory.budget_inputs import BudgetInputs
from qpipe.plots.memory import memory_breakdown
from qpipe.stages._budget_pricing import Pricing
from qpipe.stages.base import StageContext, StageResult


def mappable_reason(quant: dict[str, Any], kernel: str, offloads: bool) -> str | None:
    """Why this quant's checkpoint can't be loaded with this device map (None when it can)."""
    backend = get_backend(quant["method"])
    if offloads and backend.offload_note is not None:
        return (
            f"quant={quant.get('name')}: {backend.offload_note}; add cards or use quant=none "
            "for CPU offload"
        )
    if backend.shardable or kernel == "hf":
        return None
    spread = [o for o, m in quant_options().items() if get_backend(m).shardable]
    return (
        f"quant={quant.get('name')} loads on qpipe's own layers, which place a model on one "
        "device; spreading it over cards/host memory runs through transformers: use kernel=hf "
        f"(or quant={' / '.join(spread)})"
    )


def _metrics(est: Estimate) -> dict[str, float]:
    return {
        "mem.est_weights_gb": est.weights_gb,
        "mem.est_quant_overhead_gb": est.quant_overhead_gb,
        "mem.est_kv_cache_gb": est.kv_cache_gb,
        "mem.est_activations_gb": est.activations_gb,
        "mem.est_kernel_tuning_gb": est.kernel_tuning_gb,
        "mem.est_runtime_gb": est.runtime_gb,
        "mem.est_reserve_gb": est.reserve_gb,
        "mem.est_peak_gb": est.peak_gb,
        "mem.est_total_gb": est.total_gb,
        "model.params_b": est.params / 1e9,
        "model.params_quantized_b": est.params_quantized / 1e9,
    } | (
        {
            "mem.est_image_tokens": float(est.image_tokens),
            "mem.est_image_kv_cache_gb": est.image_kv_cache_gb,
            "mem.est_vision_activations_gb": est.vision_activations_gb,
        }
        if est.image_tokens
        else {}
    )


def _stop(
    ctx: StageContext,
    inputs: BudgetInputs,
    pricing: Pricing,
    devices: DeviceVerdict,
    quantizing: GpuQuantizing,
) -> str | None:
    """Why the pipeline cannot go on (None when it can): a card of the device map, the GPU
    while quantizing, a checkpoint that cannot be spread, or the single card."""
    cfg, chosen, est = ctx.cfg, inputs.quant, pricing.chosen
    stop = devices.problem(cfg.model.name) or quantizing.problem
    if stop is None and devices.placement is not None:
        offloads = devices.placement.offloaded_gb > 0
        stop = mappable_reason(chosen, inputs.kernel, offloads)
    if stop is None and not devices.fits:
        usable = devices.usable_gb
        options = pricing.options
        fitting = sorted((e.total_gb, n) for n, e in options.items() if e.total_gb <= usable)
        hint = f"; quant={fitting[-1][1]} would fit ({fitting[-1][0]:.2f} GB)" if fitting else ""
        stop = (
            f"{cfg.model.name} with quant={chosen['name']} needs {est.total_gb:.2f} GB "
            f"(weights {est.weights_gb:.2f}, KV {est.kv_cache_gb:.2f}, activations "
            f"{est.activations_gb:.2f}, optimizer {est.optimizer_gb:.2f}, allocator reserve "
            f"{est.reserve_gb:.2f}, runtime {est.runtime_gb:.2f}) but hardware={cfg.hardware.name} has {usable:.2f} GB "
            f"usable{hint}"
        )
    return stop


def verdict(
    ctx: StageContext,
    inputs: BudgetInputs,
    pricing: Pricing,
    devices: DeviceVerdict,
    quantizing: GpuQuantizing,
) -> StageResult:
    """The stage's result: every option's picture, the chosen one's numbers, the verdict."""
    cfg, workload, chosen = ctx.cfg, inputs.workload, inputs.quant
    est, options, auto = pricing.chosen, pricing.options, pricing.auto
    capacity, usable = inputs.capacity_gb, devices.usable_gb
    title = f"{cfg.model.name}: {workload.mode}, batch {workload.batch_size} × {workload.context_len} tokens on {cfg.hardware.name}"
    plot = memory_breakdown(
        {name: e.as_dict() for name, e in options.items()},
        capacity,
        title,
        ctx.workdir / "memory_breakdown.png",
        chosen=chosen["name"],
    )
    metrics = _metrics(est) | devices.metrics()
    metrics |= {"mem.capacity_gb": capacity, "mem.headroom_gb": usable - est.total_gb}
    outputs = {
        "fits": devices.fits,
        "capacity_gb": capacity,
        "usable_gb": usable,
        "workload": vars(workload),
        "estimate": est.as_dict(),
        "options": {name: round(e.total_gb, 3) for name, e in options.items()},
        **devices.outputs(),
        "verdict": devices.verdict(est, cfg.hardware.name, inputs.device),
    }
    artifacts = [plot]
    if auto:
        outputs.update(bit_plan=auto["bit_plan"], precision_plan=auto["precision_plan"])
        metrics.update(auto["metrics"])
        artifacts.extend(auto["artifacts"])
    outputs["quantize"] = quantizing.outputs
    metrics |= quantizing.metrics
    return StageResult(
        outputs=outputs,
        metrics=metrics,
        params={"hardware": cfg.hardware.name, "workload.mode": workload.mode},
        artifacts=artifacts,
        stop=_stop(ctx, inputs, pricing, devices, quantizing),
    )
