"""train: real optimizer steps on the loaded model, as the fine-tuning plan says (full, LoRA,
QLoRA; optimizer; precision; checkpointing), on real text (the eval corpus); the loss of every
step, and the peak of each phase (forward, backward, optimizer step) from step 2 on against
memory_budget's estimate of that phase. GPU: the torch allocator's peak and NVML's view of the
process; CPU: the resident set's growth over the loaded model."""

from __future__ import annotations

import json

from qpipe.corpora.texts import read_text, token_ids
from qpipe.devices.measure import PhaseMeter
from qpipe.errors import ConfigError
from qpipe.stages.base import StageContext, StageResult
from qpipe.training.steps import PHASES, load_libraries, make_resident, prepare, train_steps


def run(ctx: StageContext) -> StageResult:
    cfg, plan = ctx.cfg, ctx.settings.finetune
    if plan is None:
        raise ConfigError("the train stage needs a fine-tuning plan: set workload.mode=finetune")
    if plan.sharding != "none":
        raise ConfigError(
            f"finetune.sharding={plan.sharding}: the train stage runs one process; launch the "
            "plan with the memory_budget's accelerate_config.yaml / ds_config.json "
            "(pipeline=estimate writes them) or use finetune.sharding=none"
        )
    model = ctx.obj("load", "model")
    tokenizer = ctx.obj("load", "tokenizer")
    device = ctx.output("load", "device")
    est = ctx.output("memory_budget", "estimate")
    targets = ctx.output("memory_budget", "lora_targets") or []
    # measured from here: the loaded model is the baseline on CPU, absolute on GPU
    make_resident(model)
    load_libraries(plan, device)
    meter = PhaseMeter(device)
    model = prepare(model, plan, targets)
    text = read_text(cfg.eval.text) if "eval" in cfg else read_text("eval_gpl3.txt")
    ids = token_ids(tokenizer, text, plan.micro_batch * plan.seq_len)
    ids = ids.view(plan.micro_batch, plan.seq_len)
    result = train_steps(model, ids, plan, device, meter)

    metrics: dict[str, float] = {}
    for step, loss in enumerate(result.losses, 1):
        metrics[f"train.loss.step{step}"] = loss
    metrics["train.loss_first"] = result.losses[0]
    metrics["train.loss_last"] = result.losses[-1]
    metrics["train.loss_drop_pct"] = (result.losses[0] - result.losses[-1]) / result.losses[0] * 100
    metrics["train.step_s"] = sorted(result.seconds)[len(result.seconds) // 2]
    metrics["train.trainable_params"] = float(result.trainable_params)
    # GPU: the allocator's absolute peak against the budget's mem.est_<phase>_gb; CPU: what
    # the resident set grew over the loaded model, against the estimate less its loaded weights
    offset = 0.0 if meter.on_gpu else est["loaded_weights_gb"]
    growth = "" if meter.on_gpu else "_growth"
    keys = {"forward": "forward", "backward": "backward", "optimizer": "optimizer_step"}
    for phase in PHASES:
        key = keys[phase]
        measured = result.peaks_gb[phase]
        estimated = est["phases_gb"][phase] - offset
        if not meter.on_gpu:
            metrics[f"mem.est_{key}{growth}_gb"] = estimated
        metrics[f"mem.measured_{key}{growth}_gb"] = measured
        if measured > 0:
            metrics[f"mem.{key}_error_pct"] = (estimated - measured) / measured * 100
        if phase in result.nvml_gb:
            nvml = result.nvml_gb[phase]
            metrics[f"mem.nvml_{key}_gb"] = nvml
            total = est["phases_gb"][phase] + est["runtime_gb"] + est["paged_gb"]
            metrics[f"mem.{key}_total_error_pct"] = (total - nvml) / nvml * 100
    peak = max(result.peaks_gb.values())
    est_peak = est["peak_gb"] - offset
    metrics[f"mem.measured_peak{growth}_gb"] = peak
    metrics["mem.est_error_pct"] = (est_peak - peak) / peak * 100
    if result.nvml_gb:
        nvml = max(result.nvml_gb.values())
        metrics["mem.nvml_process_gb"] = nvml
        metrics["mem.est_total_error_pct"] = (est["total_gb"] - nvml) / nvml * 100

    report = {
        "losses": result.losses,
        "seconds": result.seconds,
        "measured_on": result.measured_on,
        "measured_gb": result.peaks_gb,
        "nvml_gb": result.nvml_gb,
        "estimated_gb": {p: est["phases_gb"][p] - offset for p in PHASES},
        "baseline_gb": meter.baseline / 1e9,
    }
    path = ctx.workdir / "train_steps.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return StageResult(
        outputs=report,
        metrics=metrics,
        params={"mem.measured_on": result.measured_on},
        artifacts=[path],
    )
