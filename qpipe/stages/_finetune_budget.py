"""memory_budget for fine-tuning (``workload.mode=finetune`` or a pipeline with a train stage):
the plan priced per card and in host memory (``qpipe.memory.training``), every method ×
checkpointing × batch tried against the card for the verdict, the anchors people quote beside
it, and the plan written as a DeepSpeed JSON and an accelerate config."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from qpipe.backends import finetune_base_option
from qpipe.config.finetune import FinetuneSettings
from qpipe.memory import Workload
from qpipe.memory.budget_inputs import BudgetInputs
from qpipe.memory.training import (
    GB,
    BaseWeights,
    TrainingEstimate,
    lora_targets,
    plans_that_fit,
    price_training,
    sixteen_bytes_rule_gb,
    verdict_line,
)
from qpipe.stages._budget_pricing import price
from qpipe.stages.base import StageContext, StageResult
from qpipe.training.launch import write_plan


def _quant_for(ctx: StageContext, method: str) -> dict[str, Any]:
    """The base weights' format a method implies: QLoRA's 4-bit base (the run's own option,
    or one that is such a base when pricing it beside another method), 16/32 bits otherwise;
    the backends say which options are which."""
    kind = "qlora" if method == "qlora" else "dense"
    return finetune_base_option(kind, ctx.settings.quant.as_dict())


def base_weights(
    ctx: StageContext, inputs: BudgetInputs, method: str, plan: FinetuneSettings
) -> BaseWeights:
    """The base weights' bytes as loaded and as trained, through the inference estimate (its
    weights figure knows every format): full fine-tuning trains fp32 master weights (bf16 for
    pure bf16), QLoRA's ``prepare_model_for_kbit_training`` upcasts every non-4-bit parameter
    to fp32, LoRA trains over the weights as loaded."""
    quant = _quant_for(ctx, method)
    at_rest = Workload(mode="inference", batch_size=1, context_len=1)

    def weights(dtype_bytes: int) -> tuple[int, int]:
        est = price(ctx.cfg, replace(inputs, workload=at_rest, dtype_bytes=dtype_bytes), quant)
        return int(est.weights_gb * GB), int(est.buffers_gb * GB)

    loaded, buffers = weights(inputs.dtype_bytes)
    if method == "full":
        trained = weights(2 if plan.precision == "bf16" else 4)[0]
    elif method == "qlora":
        trained = weights(4)[0]
    else:
        trained = loaded
    largest = 0
    if method == "qlora":
        shapes = {m.name: m.weight_shape for m in inputs.inventory.linears()}
        largest = max((math.prod(shapes[n]) for n in inputs.rules(True).targets), default=0)
    return BaseWeights(loaded, trained, buffers, largest)


def _metrics(est: TrainingEstimate) -> dict[str, float]:
    phases = est.phases_gb
    return {
        "mem.est_weights_gb": est.weights_gb,
        "mem.est_adapters_gb": est.adapters_gb,
        "mem.est_grads_gb": est.grads_gb,
        "mem.est_optimizer_gb": est.optimizer_gb + est.paged_gb,
        "mem.est_paged_gb": est.paged_gb,
        "mem.est_activations_gb": est.activations_gb,
        "mem.est_logits_gb": est.logits_gb,
        "mem.est_model_states_gb": est.model_states_gb,
        "mem.est_forward_gb": phases["forward"],
        "mem.est_backward_gb": phases["backward"],
        "mem.est_optimizer_step_gb": phases["optimizer"],
        "mem.est_runtime_gb": est.runtime_gb,
        "mem.est_peak_gb": est.peak_gb,
        "mem.est_total_gb": est.total_gb,
        "mem.est_host_gb": est.host_gb,
        "train.trainable_params": float(est.trainable_params),
    }


def finetune_budget(ctx: StageContext, inputs: BudgetInputs) -> StageResult:
    cfg, plan = ctx.cfg, ctx.settings.finetune
    assert plan is not None
    # bad LoRA targets are one line, before anything is priced or loaded
    targets = lora_targets(inputs.inventory, plan) if plan.trains_adapters else []
    methods = ["full", "lora", "qlora"]
    bases = {m: base_weights(ctx, inputs, m, plan) for m in methods}
    device = inputs.device
    est = price_training(
        inputs.inventory, inputs.dims, plan, bases[plan.method], inputs.dtype_bytes,
        inputs.runtime_gb, device,
    )  # fmt: skip
    # what the train stage will measure, priced at the sequence it runs (the verdict above is
    # for the workload's; on a CPU the train stage runs a shorter one: finetune.train_seq_len)
    train_est = est
    if plan.measured_seq_len != plan.seq_len:
        train_est = price_training(
            inputs.inventory, inputs.dims, plan.as_measured(), bases[plan.method],
            inputs.dtype_bytes, inputs.runtime_gb, device,
        )  # fmt: skip
    usable = inputs.capacity_gb * (1 - float(cfg.hardware.headroom_pct) / 100)
    fits = plans_that_fit(
        inputs.inventory, inputs.dims, plan, bases, inputs.dtype_bytes, inputs.runtime_gb, usable,
        device,
    )  # fmt: skip
    ok = est.total_gb <= usable
    where = f"hardware={cfg.hardware.name} ({usable:.2f} GB usable per card)"
    head = (
        f"{cfg.model.name}: {plan.method} fine-tuning, batch {plan.micro_batch} × {plan.seq_len}"
        f"{', checkpointing' if plan.checkpointing else ''}, {plan.optimizer}, {plan.precision}"
        f"{'' if plan.sharding == 'none' else f', {plan.sharding} over {plan.cards} cards'}: "
        f"{est.total_gb:.2f} GB per card"
    )
    verdict = f"{head} {'fits' if ok else 'does not fit'} {where}. " + verdict_line(fits)
    layer_class = _decoder_layer_class(inputs)
    artifacts = write_plan(plan, ctx.workdir, layer_class, inputs.device)
    metrics = _metrics(est) | {
        "mem.capacity_gb": inputs.capacity_gb,
        "mem.headroom_gb": usable - est.total_gb,
        "mem.rule16_gb": sixteen_bytes_rule_gb(inputs.inventory.total_params),
        "model.params_b": inputs.inventory.total_params / 1e9,
        "train.lora_targets": float(len(targets)),
    }
    stop = None
    if not ok:
        stop = f"{head}, but {where}. {verdict_line(fits)}"
    return StageResult(
        outputs={
            "fits": ok,
            "capacity_gb": inputs.capacity_gb,
            "usable_gb": usable,
            "workload": {
                "mode": "finetune",
                "batch_size": plan.micro_batch,
                "context_len": plan.seq_len,
            },  # fmt: skip
            "estimate": est.as_dict(),
            "train_estimate": train_est.as_dict(),
            "plans": [vars(f) | {"fits": f.fits, "sentence": f.sentence()} for f in fits],
            "bases": {m: vars(b) for m, b in bases.items()},
            "lora_targets": [m.name for m in targets],
            "plan_files": [str(p) for p in artifacts],
            "verdict": verdict,
        },
        metrics=metrics,
        params={
            "hardware": cfg.hardware.name,
            "workload.mode": "finetune",
            "finetune.method": plan.method,
            "finetune.optimizer": plan.optimizer,
            "finetune.precision": plan.precision,
            "finetune.checkpointing": str(plan.checkpointing),
            "finetune.sharding": plan.sharding,
        },
        artifacts=artifacts,
        stop=stop,
    )


def _decoder_layer_class(inputs: BudgetInputs) -> str:
    """The decoder layer's class, which FSDP wraps one by one: transformers names it after the
    config (``Qwen3Config`` → ``Qwen3DecoderLayer``)."""
    config = inputs.model_config
    text = getattr(config, "text_config", None) or config
    return type(text).__name__.removesuffix("Config") + "DecoderLayer"
