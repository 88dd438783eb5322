"""memory_budget: does it fit? Estimated from the config alone (meta device, no weights), for
the chosen precision plan and for every other quant option, against the hardware's memory."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from qpipe.config.compose import CONF_DIR, load_group, resolve_device, resolve_dtype, resolve_kernel
from qpipe.devices.budget import mappable_reason, plan_devices, quantize_on_gpu
from qpipe.devices.hardware import per_card, resolve_cards
from qpipe.errors import ConfigError
from qpipe.evaluation.vision import load_image
from qpipe.kernels.tuning import TUNER, tuning_transient_bytes
from qpipe.memory import (
    Estimate,
    KernelFacts,
    VisionDims,
    Workload,
    arch_dims,
    build_inventory,
    estimate,
    quantized_matmuls,
)
from qpipe.memory.exclusion import plan_precision
from qpipe.models import load_config
from qpipe.models.processor import is_vlm, vision_dims
from qpipe.plots.memory import memory_breakdown
from qpipe.stages._auto_plan import auto_plan
from qpipe.stages.base import StageContext, StageResult


def _workload(cfg) -> Workload:
    # Values were checked by validate_config before the run started.
    w = cfg.workload
    return Workload(mode=w.mode, batch_size=int(w.batch_size), context_len=int(w.context_len))


def _capacity_gb(ctx: StageContext) -> float:
    hw = ctx.cfg.hardware
    cards = per_card(hw.memory_gb, "hardware.memory_gb")
    if cards:  # one number for every card, or a list: the first card (a one-card plan's)
        return cards[0]
    return ctx.output("env_check", "gpu_memory_gb") or ctx.output("env_check", "host_memory_gb")


def _runtime_gb(ctx: StageContext, device: str) -> float:
    hw = ctx.cfg.hardware
    if hw.runtime_overhead_gb is not None:
        return float(hw.runtime_overhead_gb)
    if not device.startswith("cuda"):
        return 0.0  # on CPU we measure the growth of the process, not its libraries
    measured = ctx.output("env_check", "cuda_context_gb")
    return float(measured) if measured is not None else 0.55


def _l2_bytes(cfg, device: str) -> int:
    if cfg.hardware.get("l2_mb") is not None:
        return int(float(cfg.hardware.l2_mb) * 2**20)
    if cfg.hardware.name == "auto" and device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    return 50 * 2**20  # an H100's: the size of the datacenter cards qpipe's kernels target


def _kernel_facts(cfg, quant: dict, plan, inventory, dtype_bytes: int, device: str) -> KernelFacts:
    """What the load stage's fusion and the 4-bit kernel's autotuner add to this run."""
    # 4-bit gptq/awq/rtn load as QuantLinear, the only layers fusion and the tuner touch
    quantlinear = quant["method"] in ("gptq", "awq", "rtn") and int(quant.get("bits") or 0) == 4
    fused = quantlinear and bool(cfg.get("fuse_projections", True))
    if not quantlinear or not device.startswith("cuda") or resolve_kernel(cfg, device) != "triton":
        return KernelFacts(fused_projections=fused)
    matmuls = quantized_matmuls(inventory, plan, quant, dtype_bytes, fused)
    # a process that already tuned these shapes (a sweep's later jobs) makes no copies
    fresh = [b for (n, k), b in matmuls if not TUNER.has_tuned(n, k)]
    return KernelFacts(fused, tuning_transient_bytes(fresh, _l2_bytes(cfg, device)))


def _image_cost(cfg, config) -> VisionDims | None:
    """VLMs run their workload with ``eval.image`` in the context (see validate_vram)."""
    if not is_vlm(config) or "eval" not in cfg:
        return None
    width, height = load_image(cfg.eval.get("image")).size
    vision = vision_dims(config, width, height)
    needed = vision.image_tokens + 2 + int(cfg.eval.max_new_tokens)
    if needed > int(cfg.workload.context_len):
        raise ConfigError(
            f"workload.context_len={cfg.workload.context_len} cannot hold the image "
            f"({vision.tiles} tiles = {vision.image_tokens} tokens) and "
            f"{cfg.eval.max_new_tokens} new tokens; use workload.context_len>={needed}"
        )
    return vision


def _metrics(est: Estimate) -> dict[str, float]:
    return {
        "mem.est_weights_gb": est.weights_gb,
        "mem.est_quant_overhead_gb": est.quant_overhead_gb,
        "mem.est_kv_cache_gb": est.kv_cache_gb,
        "mem.est_activations_gb": est.activations_gb,
        "mem.est_kernel_tuning_gb": est.kernel_tuning_gb,
        "mem.est_runtime_gb": est.runtime_gb,
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


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    # A named GPU is a plan for that GPU, wherever qpipe runs now (plan a 24 GB card from a
    # laptop): price it in the GPU's dtype and bitsandbytes' CUDA layout.
    device = resolve_device(cfg) if cfg.hardware.name == "auto" else "cuda"
    dtype_bytes = resolve_dtype(cfg, device).itemsize
    workload = _workload(cfg)
    config = load_config(cfg.model)
    inventory = build_inventory(config, cfg.model.get("model_class", "AutoModelForCausalLM"))
    dims = arch_dims(config)
    runtime = _runtime_gb(ctx, device)
    exclude = OmegaConf.to_container(cfg.exclude, resolve=True)
    measured = (
        ctx.output("sensitivity", "layers") if ctx.output("sensitivity", "measured") else None
    )

    def rules(quant: dict):
        return plan_precision(inventory, exclude, quant["method"] != "none", measured, dtype_bytes)

    vision = _image_cost(cfg, config)

    def price(quant: dict) -> Estimate:
        plan = rules(quant)
        kernels = _kernel_facts(cfg, quant, plan, inventory, dtype_bytes, device)
        return estimate(
            inventory, plan, quant, dims, workload, dtype_bytes, runtime, device, vision, kernels
        )

    capacity = _capacity_gb(ctx)
    chosen = OmegaConf.to_container(cfg.quant, resolve=True)
    auto = None
    if chosen["method"] == "auto":
        # quant=auto plans bits for one card of this hardware (its usable memory)
        one_card = capacity * (1 - float(cfg.hardware.headroom_pct) / 100)
        auto = auto_plan(
            ctx,
            inventory,
            rules(chosen),
            measured,
            chosen,
            dims,
            workload,
            dtype_bytes,
            runtime,
            device,
            one_card,
        )
        est = auto["estimate"]
    else:
        est = price(chosen)
    options = {chosen["name"]: est}
    for path in sorted((CONF_DIR / "quant").glob("*.yaml")):
        if path.stem not in options and path.stem != "auto":
            options[path.stem] = price(OmegaConf.to_container(load_group("quant", path.stem)))
    cards = resolve_cards(cfg, device, capacity)
    devices = plan_devices(
        cfg,
        cards,
        est,
        config,
        inventory,
        rules(chosen),
        chosen,
        dims,
        workload,
        dtype_bytes,
        device,
    )
    usable = devices.usable_gb
    fits = devices.fits
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
        "fits": fits,
        "capacity_gb": capacity,
        "usable_gb": usable,
        "workload": vars(workload),
        "estimate": est.as_dict(),
        "options": {name: round(e.total_gb, 3) for name, e in options.items()},
        **devices.outputs(),
        "verdict": devices.verdict(est, cards, cfg.hardware.name, device),
    }
    artifacts = [plot]
    if auto:
        outputs.update(bit_plan=auto["bit_plan"], precision_plan=auto["precision_plan"])
        metrics.update(auto["metrics"])
        artifacts.extend(auto["artifacts"])
    quantizing, quantize_metrics, quantize_problem = quantize_on_gpu(
        cfg,
        chosen,
        options["none"],
        inventory,
        plan_precision(inventory, exclude, True, measured, dtype_bytes),
        dims,
        dtype_bytes,
        usable,
        device,
    )
    outputs["quantize"] = quantizing
    metrics |= quantize_metrics
    stop = devices.problem(cfg.model.name) or quantize_problem
    if stop is None and devices.placement is not None:
        offloads = devices.placement.offloaded_gb > 0
        stop = mappable_reason(chosen, resolve_kernel(cfg, device), offloads)
    if stop is None and not fits:
        fitting = sorted((e.total_gb, n) for n, e in options.items() if e.total_gb <= usable)
        hint = f"; quant={fitting[-1][1]} would fit ({fitting[-1][0]:.2f} GB)" if fitting else ""
        stop = (
            f"{cfg.model.name} with quant={chosen['name']} needs {est.total_gb:.2f} GB "
            f"(weights {est.weights_gb:.2f}, KV {est.kv_cache_gb:.2f}, activations "
            f"{est.activations_gb:.2f}, optimizer {est.optimizer_gb:.2f}, runtime "
            f"{est.runtime_gb:.2f}) but hardware={cfg.hardware.name} has {usable:.2f} GB "
            f"usable{hint}"
        )
    return StageResult(
        outputs=outputs,
        metrics=metrics,
        params={"hardware": cfg.hardware.name, "workload.mode": workload.mode},
        artifacts=artifacts,
        stop=stop,
    )
