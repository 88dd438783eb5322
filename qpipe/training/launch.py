"""The plan as files a user starts their own training with: a DeepSpeed JSON
(``zero_optimization`` stage, offload, bf16, micro-batch, gradient accumulation) and an
accelerate config (DeepSpeed, FSDP2, several GPUs or one), both for the plan the budget
priced. Plain data: the memory_budget stage writes them and the runner logs them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from qpipe.config.finetune import FinetuneSettings
from qpipe.memory.training import DS_REDUCE_BUCKET

DS_STAGES = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 0}


def _offload(on: bool) -> dict[str, Any]:
    # pinned host buffers: what the budget prices as host memory (ZeRO-Offload's CPU Adam)
    return {"device": "cpu", "pin_memory": True} if on else {"device": "none"}


def deepspeed_config(plan: FinetuneSettings) -> dict[str, Any]:
    """DeepSpeed's JSON for the plan (stage 0 for sharding none/fsdp: plain data parallel)."""
    stage = DS_STAGES[plan.sharding]
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": DS_REDUCE_BUCKET,  # priced: two such buffers per GPU
    }
    if stage:
        zero["offload_optimizer"] = _offload(plan.offload_optimizer)
    if stage == 3:
        zero["offload_param"] = _offload(plan.offload_params)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.cards,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": plan.precision in ("mixed", "bf16")},
        "zero_optimization": zero,
        "steps_per_print": 1,
    }
    if plan.optimizer == "adamw":
        # DeepSpeed's own AdamW (CPU Adam when offloaded); 8-bit and SGD optimizers are the
        # client's (bitsandbytes / torch) and are passed to deepspeed.initialize in code
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": plan.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        }
    return config


def accelerate_config(
    plan: FinetuneSettings, layer_class: str, ds_file: str, device: str
) -> dict[str, Any]:
    """accelerate's config file for ``accelerate launch --config_file``: DeepSpeed with the
    JSON beside it, FSDP2 wrapping ``layer_class`` (the decoder layer), or plain data
    parallel."""
    mixed = "bf16" if plan.precision in ("mixed", "bf16") else "no"
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "machine_rank": 0,
        "num_machines": 1,
        "num_processes": plan.cards,
        "mixed_precision": mixed,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": not device.startswith("cuda"),
        "main_training_function": "main",
    }
    if plan.sharding.startswith("zero"):
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "deepspeed_config_file": ds_file,
            "zero3_init_flag": plan.sharding == "zero3",
        }
    elif plan.sharding == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": layer_class,
            "fsdp_offload_params": plan.offload_params or plan.offload_optimizer,
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": plan.checkpointing,
        }
    else:
        config["distributed_type"] = "MULTI_GPU" if plan.cards > 1 else "NO"
    return config


def write_plan(plan: FinetuneSettings, folder: Path, layer_class: str, device: str) -> list[Path]:
    """``ds_config.json`` and ``accelerate_config.yaml`` in ``folder``, each written whole."""
    folder.mkdir(parents=True, exist_ok=True)
    ds_path = folder / "ds_config.json"
    acc_path = folder / "accelerate_config.yaml"
    texts = {
        ds_path: json.dumps(deepspeed_config(plan), indent=2) + "\n",
        acc_path: yaml.safe_dump(
            accelerate_config(plan, layer_class, ds_path.name, device), sort_keys=False
        ),
    }
    for path, text in texts.items():
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return [ds_path, acc_path]
