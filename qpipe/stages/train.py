"""train: real optimizer steps on the loaded model, as the fine-tuning plan says (full, LoRA,
QLoRA; optimizer; precision; checkpointing), on real text (the eval corpus); the loss of every
step, and the peak of each phase (forward, backward, optimizer step) from step 2 on against
memory_budget's estimate of that phase at the shape the steps run (``finetune.train_seq_len``).

GPU: the torch allocator's absolute peak and NVML's view of the process. CPU: the resident
set's growth over the model as made trainable (loaded weights, adapters, peft's wrapper) after
one warm-up forward/backward at the steps' shape (the libraries' first use), against the
estimate less the weights and adapters; what making it trainable took is reported beside."""

from __future__ import annotations

import json

from qpipe.config.finetune import FinetuneSettings
from qpipe.corpora.texts import read_text, token_ids
from qpipe.devices.measure import PhaseMeter
from qpipe.errors import ConfigError
from qpipe.stages.base import StageContext, StageResult
from qpipe.training.steps import (
    PHASES,
    load_libraries,
    make_resident,
    prepare,
    train_steps,
    warm_up,
)

PHASE_KEYS = {"forward": "forward", "backward": "backward", "optimizer": "optimizer_step"}


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
    # priced at the sequence the steps run (finetune.train_seq_len), which may be shorter than
    # the workload's the verdict was for
    est = ctx.output("memory_budget", "train_estimate") or ctx.output("memory_budget", "estimate")
    seq_len = plan.measured_seq_len
    targets = ctx.output("memory_budget", "lora_targets") or []
    text = read_text(cfg.eval.text) if "eval" in cfg else read_text("eval_gpl3.txt")
    ids = token_ids(tokenizer, text, plan.micro_batch * seq_len)
    ids = ids.view(plan.micro_batch, seq_len).to(device)
    make_resident(model)
    load_libraries(plan, device)
    meter = PhaseMeter(device)  # CPU: the loaded model's resident set
    try:
        model = prepare(model, plan, targets)
        trainable_growth = warm_growth = None
        if not meter.on_gpu:
            trainable_growth = meter.rebase()
            warm_up(model, ids, plan)
            warm_growth = meter.rebase()
        result = train_steps(model, ids, plan, device, meter)
    finally:
        meter.close()

    # GPU: the allocator's absolute peak against the budget's phase; CPU: the growth over
    # the trainable model against the estimate less the weights (as trained) and adapters
    offset = 0.0 if meter.on_gpu else est["weights_gb"] + est["adapters_gb"]
    estimated = {p: est["phases_gb"][p] - offset for p in PHASES}
    metrics = _loss_metrics(result.losses, result.seconds)
    metrics |= {
        "train.trainable_params": float(result.trainable_params),
        "train.batch_size": float(plan.micro_batch),
        "train.seq_len": float(seq_len),
    }
    metrics |= _memory_metrics(est, estimated, result.peaks_gb, result.nvml_gb, meter.on_gpu)
    if trainable_growth is not None:
        est_trainable = est["weights_gb"] + est["adapters_gb"] - est["loaded_weights_gb"]
        metrics["mem.est_trainable_growth_gb"] = est_trainable
        metrics["mem.measured_trainable_growth_gb"] = trainable_growth
        metrics["mem.measured_warmup_growth_gb"] = warm_growth or 0.0

    report = {
        "losses": result.losses,
        "seconds": result.seconds,
        "measured_on": result.measured_on,
        "measured_gb": result.peaks_gb,
        "nvml_gb": result.nvml_gb,
        "estimated_gb": estimated,
        "baseline_gb": meter.baseline / 1e9,
        "trainable_growth_gb": trainable_growth,
        "warmup_growth_gb": warm_growth,
        "batch_size": plan.micro_batch,
        "seq_len": seq_len,
    }
    report["summary"] = summary(plan, device, result.losses, report)
    path = ctx.workdir / "train_steps.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return StageResult(
        outputs=report,
        metrics=metrics,
        params={"mem.measured_on": result.measured_on},
        artifacts=[path],
    )


def _loss_metrics(losses: list[float], seconds: list[float]) -> dict[str, float]:
    metrics = {f"train.loss.step{step}": loss for step, loss in enumerate(losses, 1)}
    metrics["train.loss_first"] = losses[0]
    metrics["train.loss_last"] = losses[-1]
    metrics["train.loss_drop_pct"] = (losses[0] - losses[-1]) / losses[0] * 100
    metrics["train.step_s"] = sorted(seconds)[len(seconds) // 2]
    return metrics


def _memory_metrics(
    est: dict,
    estimated: dict[str, float],
    peaks: dict[str, float],
    nvml: dict[str, float],
    on_gpu: bool,
) -> dict[str, float]:
    """Each phase's estimate against its measured peak (and NVML's total on GPU), and the
    step's peak over all phases."""
    growth = "" if on_gpu else "_growth"
    metrics: dict[str, float] = {}
    for phase in PHASES:
        key, measured = PHASE_KEYS[phase], peaks[phase]
        if not on_gpu:
            metrics[f"mem.est_{key}{growth}_gb"] = estimated[phase]
        metrics[f"mem.measured_{key}{growth}_gb"] = measured
        if measured > 0:
            metrics[f"mem.{key}_error_pct"] = (estimated[phase] - measured) / measured * 100
        if phase in nvml:
            total = est["phases_gb"][phase] + est["runtime_gb"] + est["paged_gb"]
            metrics[f"mem.nvml_{key}_gb"] = nvml[phase]
            metrics[f"mem.{key}_total_error_pct"] = (total - nvml[phase]) / nvml[phase] * 100
    peak, est_peak = max(peaks.values()), max(estimated.values())
    metrics[f"mem.measured_peak{growth}_gb"] = peak
    metrics["mem.est_error_pct"] = (est_peak - peak) / peak * 100
    if nvml:
        metrics["mem.nvml_process_gb"] = max(nvml.values())
        metrics["mem.est_total_error_pct"] = (
            (est["total_gb"] - max(nvml.values())) / max(nvml.values()) * 100
        )
    return metrics


def summary(plan: FinetuneSettings, device: str, losses: list[float], report: dict) -> str:
    """One line for the end of the run: what ran (and how it differs from the workload the
    verdict priced), the loss by step, each phase's estimate against what was measured."""
    shape = f"batch {plan.micro_batch} × {report['seq_len']}"
    if report["seq_len"] != plan.seq_len:
        shape += f" (finetune.train_seq_len; the verdict is for × {plan.seq_len})"
    loss = " → ".join(f"{x:.3f}" for x in losses)
    what = "allocator peak" if device.startswith("cuda") else "host RSS growth"
    phases = []
    for phase in PHASES:
        e, m = report["estimated_gb"][phase], report["measured_gb"].get(phase, 0.0)
        err = f" ({(e - m) / m * 100:+.0f} %)" if m > 0 else ""
        phases.append(f"{phase} {e:.3g}/{m:.3g}{err}")
    return (
        f"{plan.steps} {plan.method} steps on {device}, {shape}: loss {loss}; "
        f"{what} est/measured GB from step 2 on: {', '.join(phases)}"
    )
