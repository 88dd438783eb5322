"""memory_budget: does it fit? Estimated from the config alone (meta device, no weights), for
the chosen precision plan and for every other quant option, against the hardware's memory.

The stage reads the config once into ``BudgetInputs``, then prices the options
(``_budget_pricing``), plans the devices (``qpipe.devices.budget``: one card or a device map,
and where llm-compressor quantizes) and gives the verdict (``_budget_verdict``)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from qpipe.backends import get_backend
from qpipe.devices.budget import GpuQuantizing, plan_devices, quantize_on_gpu
from qpipe.devices.hardware import per_card
from qpipe.errors import ConfigError
from qpipe.evaluation.vision import load_image
from qpipe.memory import VisionDims, Workload, arch_dims, build_inventory
from qpipe.memory.budget_inputs import BudgetInputs
from qpipe.models import load_config
from qpipe.models.processor import is_vlm, vision_dims
from qpipe.stages._budget_pricing import price_options
from qpipe.stages._budget_verdict import verdict
from qpipe.stages._finetune_budget import finetune_budget
from qpipe.stages.base import StageContext, StageResult


def _workload(cfg: DictConfig) -> Workload:
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


def _image_cost(cfg: DictConfig, config) -> VisionDims | None:
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


def budget_inputs(ctx: StageContext) -> BudgetInputs:
    """What every part of the budget prices with, read once from the config and env_check."""
    cfg, settings = ctx.cfg, ctx.settings
    # A named GPU is a plan for that GPU, wherever qpipe runs now (plan a 24 GB card from a
    # laptop): priced in the GPU's dtype, kernel and bitsandbytes' CUDA layout (Settings).
    device = settings.budget_device
    workload = _workload(cfg)
    config = load_config(cfg.model)
    model_class = settings.model_class
    sensitivity = ctx.output("sensitivity", "measured")
    quant = settings.quant.as_dict()
    backend = get_backend(quant["method"])
    dtype_bytes = settings.budget_dtype.itemsize
    kernel = settings.budget_kernel
    return BudgetInputs(
        model_config=config,
        model_class=model_class,
        inventory=build_inventory(config, model_class),
        dims=arch_dims(config),
        workload=workload,
        dtype_bytes=dtype_bytes,
        device=device,
        kernel=kernel,
        runtime_gb=_runtime_gb(ctx, device),
        exclude=OmegaConf.to_container(cfg.exclude, resolve=True),
        measured=ctx.output("sensitivity", "layers") if sensitivity else None,
        # fine-tuning trains on text (the vision tower frozen): no image in its sequences
        vision=None if settings.finetune is not None else _image_cost(cfg, config),
        capacity_gb=_capacity_gb(ctx),
        quant=quant,
        weight_format=backend.weight_format(quant, dtype_bytes, device, kernel),
        quantizes=backend.quantizes,
    )


def run(ctx: StageContext) -> StageResult:
    """Price the chosen quant option and the others, plan the devices for the chosen one, and
    say whether it fits (stopping the pipeline with the numbers when it does not)."""
    inputs = budget_inputs(ctx)
    if ctx.settings.finetune is not None:  # training: priced by qpipe.memory.training
        return finetune_budget(ctx, inputs)
    pricing = price_options(ctx, inputs)
    devices = plan_devices(ctx.cfg, pricing.chosen, inputs)
    backend = get_backend(inputs.quant["method"])
    quantizing = (
        quantize_on_gpu(
            ctx.cfg,
            inputs,
            pricing.full_precision,
            devices.usable_gb,
            calibrates=backend.needs_calibration(inputs.quant),
            calibration=backend.calibration_memory,
        )
        if backend.gpu_quantizing_priced
        else GpuQuantizing(None, {}, None)
    )
    return verdict(ctx, inputs, pricing, devices, quantizing)
