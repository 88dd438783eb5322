"""Real optimizer steps on a loaded model (transformers + peft + bitsandbytes), the loss of
each, and the peak of each phase (forward, backward, optimizer step) from step 2 on: the first
step allocates the optimizer's states, and what a user's run keeps is the steady state.

The same batch of real text is trained on at every step, so a falling loss shows that the
gradients reach the trained parameters and the optimizer moves them."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from qpipe.config.finetune import FinetuneSettings
from qpipe.devices.measure import PhaseMeter
from qpipe.errors import ConfigError
from qpipe.memory.inventory import VISION_PREFIXES

PHASES = ("forward", "backward", "optimizer")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    peaks_gb: dict[str, float] = field(default_factory=dict)  # per phase, from step 2 on
    nvml_gb: dict[str, float] = field(default_factory=dict)
    trainable_params: int = 0
    measured_on: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _freeze_vision(model: torch.nn.Module) -> int:
    frozen = 0
    for name, param in model.named_parameters():
        if any(p in name.split(".") for p in VISION_PREFIXES):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def make_resident(model: torch.nn.Module) -> None:
    """Read every weight once: safetensors are memory-mapped, and pages first touched by the
    first step would count as the step's memory on CPU instead of the loaded model's."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.device.type == "cpu" and tensor.numel():
                tensor.view(-1)[:: max(1, 4096 // tensor.element_size())].sum()


def load_libraries(plan: FinetuneSettings, device: str) -> None:
    """One tiny step through what the real steps use (peft's LoRA, autograd, the loss, the
    optimizer): a library's first use (peft imports its dispatchers, bitsandbytes among them;
    the autograd engine starts its threads) costs tens of MB of host memory that are not the
    model's, and on CPU the baseline is taken after it."""
    tiny = torch.nn.Sequential(torch.nn.Embedding(8, 8), torch.nn.Linear(8, 8)).to(device)
    if plan.trains_adapters:
        from peft import LoraConfig, get_peft_model

        tiny = get_peft_model(tiny, LoraConfig(r=1, target_modules=["1"]))
    opt = optimizer_for(tiny, plan) if plan.optimizer != "paged_adamw_8bit" else None
    ids = torch.arange(8, device=device).view(1, 8)
    loss = torch.nn.functional.cross_entropy(tiny(ids).view(8, 8), ids.view(8))
    loss.backward()
    if opt is not None:
        opt.step()


def prepare(
    model: torch.nn.Module, plan: FinetuneSettings, lora_modules: list[str]
) -> torch.nn.Module:
    """The loaded model made trainable as the plan says: full (fp32 master weights under
    mixed precision, bf16 for pure bf16), LoRA adapters on ``lora_modules`` (fp32 under mixed
    precision, as peft makes them), QLoRA through ``prepare_model_for_kbit_training``;
    gradient checkpointing without re-entrance; a VLM's vision tower frozen."""
    model.config.use_cache = False
    if plan.method == "full":
        model.to(torch.bfloat16 if plan.precision == "bf16" else torch.float32)
        for param in model.parameters():
            param.requires_grad_(True)
    if plan.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=False, auto_clear_cache=False
        )
    if plan.trains_adapters:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=plan.lora.rank,
            lora_alpha=plan.lora.alpha,
            lora_dropout=plan.lora.dropout,
            target_modules=lora_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config, autocast_adapter_dtype=plan.precision != "bf16")
    if not plan.train_vision:
        _freeze_vision(model)
    if plan.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if plan.trains_adapters:  # frozen embeddings: the checkpointed layers need an input grad
            model.enable_input_require_grads()
    model.train()
    return model


def warm_up(model: torch.nn.Module, input_ids: torch.Tensor, plan: FinetuneSettings) -> None:
    """One forward and backward at the steps' own shape, the gradients dropped: on CPU the
    libraries' first use at that shape (BLAS packing buffers, autograd's worker thread, the
    kernels' code pages: 10-25 MB of host memory on SmolLM2 that are not the step's) happens
    before the baseline the steps are measured from."""
    device = input_ids.device.type
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=_autocast(plan)):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    del loss
    model.zero_grad(set_to_none=True)


def _autocast(plan: FinetuneSettings) -> bool:
    return plan.precision == "mixed"


def optimizer_for(model: torch.nn.Module, plan: FinetuneSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"finetune.method={plan.method}: nothing in the model would train")
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=plan.lr)
    if plan.optimizer == "adamw":
        # fused: one kernel, no full-size temporaries (what the budget prices)
        return torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0, fused=True)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if plan.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=plan.lr, weight_decay=0.0)


def train_steps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    plan: FinetuneSettings,
    device: str,
    meter: PhaseMeter | None = None,
) -> TrainResult:
    """``plan.steps`` optimizer steps on ``input_ids`` ([micro_batch, seq_len], the labels
    too), each phase measured from step 2 on."""
    meter = meter or PhaseMeter(device)
    opt = optimizer_for(model, plan)
    result = TrainResult(
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        measured_on="cuda allocator" if meter.on_gpu else "host RSS growth over the loaded model",
    )
    ids = input_ids.to(device)
    autocast = torch.autocast(
        device_type=torch.device(device).type,
        dtype=torch.bfloat16,
        enabled=_autocast(plan),
    )
    for step in range(1, plan.steps + 1):
        record = step >= 2
        start = time.perf_counter()
        with meter.phase("forward", record), autocast:
            # the output (and its logits) goes as soon as the loss is out, as in HF's Trainer
            loss = model(input_ids=ids, labels=ids).loss
        with meter.phase("backward", record):
            loss.backward()
        with meter.phase("optimizer", record):
            opt.step()
            opt.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))
        result.seconds.append(time.perf_counter() - start)
        del loss
    result.peaks_gb, result.nvml_gb = dict(meter.peaks), dict(meter.nvml)
    with contextlib.suppress(Exception):
        del opt
    return result
