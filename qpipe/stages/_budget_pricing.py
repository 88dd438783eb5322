"""memory_budget's pricing: the estimate of the chosen quant option (``quant=auto``: its bit
plan for one card) and of every other option, with what qpipe's kernels add to each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from qpipe.backends import get_backend, option_config, quant_options, weight_format_of
from qpipe.errors import ConfigError
from qpipe.kernels.tuning import TUNER, tuning_transient_bytes
from qpipe.memory import Estimate, Inventory, KernelFacts, estimate, quantized_matmuls
from qpipe.memory.budget_inputs import BudgetInputs
from qpipe.memory.exclusion import PrecisionPlan
from qpipe.memory.formats import DenseFormat, WeightFormat
from qpipe.stages._auto_plan import auto_plan
from qpipe.stages.base import StageContext


@dataclass
class Pricing:
    chosen: Estimate
    options: dict[str, Estimate]  # by quant option name, the chosen one first
    auto: dict[str, Any] | None  # quant=auto's plan (see auto_plan)
    full_precision: Estimate  # nothing quantized: what llm-compressor loads before it rounds


def _l2_bytes(cfg: DictConfig, device: str) -> int:
    if cfg.hardware.get("l2_mb") is not None:
        return int(float(cfg.hardware.l2_mb) * 2**20)
    if cfg.hardware.name == "auto" and device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    return 50 * 2**20  # an H100's: the size of the datacenter cards qpipe's kernels target


def kernel_facts(
    cfg: DictConfig,
    quant: dict[str, Any],
    plan: PrecisionPlan,
    inventory: Inventory,
    fmt: WeightFormat,
    device: str,
    kernel: str,
) -> KernelFacts:
    """What the load stage's fusion and the 4-bit kernel's autotuner add to this run
    (``kernel``: what ``quant``'s layers run on ``device``)."""
    # 4-bit layers on QuantLinear are the only ones fusion and the tuner touch
    backend = get_backend(quant["method"])
    quantlinear = backend.runs_on_qpipe_kernel and int(quant.get("bits") or 0) == 4
    fused = quantlinear and bool(cfg.get("fuse_projections", True))
    if not quantlinear or not device.startswith("cuda") or kernel != "triton":
        return KernelFacts(fused_projections=fused)
    matmuls = quantized_matmuls(inventory, plan, fmt, fused)
    # a process that already tuned these shapes (a sweep's later jobs) makes no copies
    fresh = [b for (n, k), b in matmuls if not TUNER.has_tuned(n, k)]
    return KernelFacts(fused, tuning_transient_bytes(fresh, _l2_bytes(cfg, device)))


def price(cfg: DictConfig, inputs: BudgetInputs, quant: dict[str, Any]) -> Estimate:
    """The memory a run with ``quant`` needs, in its backend's weight format on the budget's
    device with the kernel it would run there."""
    backend = get_backend(quant["method"])
    chosen = quant.get("name") == inputs.quant.get("name")
    kernel = inputs.kernel if chosen else backend.resolve_kernel("auto", quant, inputs.device)
    fmt = weight_format_of(quant, inputs.dtype_bytes, inputs.device, kernel)
    plan = inputs.rules(backend.quantizes)
    kernels = kernel_facts(cfg, quant, plan, inputs.inventory, fmt, inputs.device, kernel)
    return estimate(
        inputs.inventory,
        plan,
        fmt,
        inputs.dims,
        inputs.workload,
        inputs.dtype_bytes,
        inputs.runtime_gb,
        inputs.vision,
        kernels,
        device=inputs.device,
    )


def price_options(ctx: StageContext, inputs: BudgetInputs) -> Pricing:
    """The chosen option's estimate and every built-in quant option's, to compare."""
    chosen = inputs.quant
    auto = None
    if get_backend(chosen["method"]).plans_widths:
        # quant=auto plans bits for one card of this hardware (its usable memory)
        one_card = inputs.capacity_gb * (1 - float(ctx.cfg.hardware.headroom_pct) / 100)
        auto = auto_plan(ctx, inputs, one_card)
        est = auto["estimate"]
    else:
        est = price(ctx.cfg, inputs, chosen)
    options = {chosen["name"]: est}
    for option, method in quant_options().items():
        backend = get_backend(method)
        if option in options or backend.plans_widths:
            continue  # a plan's price is the card's: it is priced when chosen
        quant = option_config(option)
        try:
            backend.validate(quant)
        except ConfigError:
            continue  # a user's option that cannot run as written prices nothing
        options[option] = price(ctx.cfg, inputs, quant)
    full = estimate(
        inputs.inventory,
        inputs.rules(quantizes=False),
        DenseFormat(inputs.dtype_bytes),
        inputs.dims,
        inputs.workload,
        inputs.dtype_bytes,
        inputs.runtime_gb,
        inputs.vision,
        device=inputs.device,
    )
    return Pricing(est, options, auto, full)
