"""validate_vram: run the budgeted workload on the loaded model and compare the measured peak
with the estimate. GPU: the torch allocator's peak (+ NVML's process view). CPU: the growth
of the process's resident set, reported as host memory, never as VRAM."""

from __future__ import annotations

import torch

from qpipe.corpora.texts import read_text, token_ids
from qpipe.devices.measure import MemoryWindow
from qpipe.devices.peak_memory import per_device_metrics
from qpipe.evaluation.vision import count_image_tokens, load_image, workload_inputs
from qpipe.plots.memory import memory_breakdown
from qpipe.stages.base import StageContext, StageResult


def _run_workload(model, tokenizer, processor, ctx: StageContext, device: str) -> dict[str, int]:
    """The workload the budget priced: batch × context_len tokens (prompt + generated), the
    image among them for VLMs."""
    cfg = ctx.cfg
    batch = int(cfg.workload.batch_size)
    context = int(cfg.workload.context_len)
    max_pos = getattr(
        getattr(model.config, "text_config", model.config), "max_position_embeddings", context
    )
    context = min(context, max_pos)
    if ctx.settings.task == "feature-extraction":
        ids = token_ids(tokenizer, read_text(cfg.eval.text), context).repeat(batch, 1).to(device)
        with torch.inference_mode():
            model(input_ids=ids)
        return {"prompt_tokens": context, "new_tokens": 0}
    new = min(int(cfg.eval.max_new_tokens), context - 1)
    prompt = context - new
    ids = token_ids(tokenizer, read_text(cfg.eval.text), prompt)
    if processor is not None:  # a VLM: the image first, then text, prompt tokens in all
        image = load_image(cfg.eval.get("image"))
        inputs = workload_inputs(processor, image, ids, prompt, device, ctx.settings.dtype)
        inputs["pixel_values"] = inputs["pixel_values"].repeat(batch, 1, 1, 1)
    else:
        inputs = {"input_ids": ids.view(1, -1).to(device)}
    inputs["input_ids"] = inputs["input_ids"].repeat(batch, 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
    image_tokens = count_image_tokens(processor, inputs) if processor is not None else 0
    return {"prompt_tokens": prompt, "new_tokens": new, "image_tokens": image_tokens}


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    model = ctx.obj("load", "model")
    tokenizer = ctx.obj("load", "tokenizer")
    window: MemoryWindow = ctx.obj("load", "memory_window")
    device = ctx.output("load", "device")
    loading_peak = window.split_host_peak()
    processor = ctx.inputs["load"].objects.get("processor")
    shape = _run_workload(model, tokenizer, processor, ctx, device)
    phases = window.phases_gb() if isinstance(window, MemoryWindow) and window.on_gpu else {}
    window.read()  # load opened it and closes it (see qpipe.stages.load)

    est = dict(ctx.output("memory_budget", "estimate"))
    measured = window.used_gb
    placement = ctx.output("memory_budget", "placement")
    per_device = per_device_metrics(window, placement) if placement else {}
    if placement:  # spread over devices: the GPUs' share of the estimate is what was measured
        est["peak_gb"] = per_device["mem.est_gpu_peak_gb"]
        est["total_gb"] = sum(d["total_gb"] for d in placement["devices"] if d["device"] != "cpu")
    metrics = {
        "mem.measured_peak_gb": measured,
        "mem.est_error_pct": (est["peak_gb"] - measured) / measured * 100,
        **per_device,
        **phases,
    }
    loaded = ctx.inputs["load"].metrics["mem.loaded_weights_gb"]
    metrics["mem.weights_error_pct"] = (est["weights_gb"] - loaded) / loaded * 100
    if window.on_gpu:
        metrics["mem.reserved_peak_gb"] = window.reserved_peak / 1e9
        # Nonzero means an earlier stage still holds GPU memory; it is left out of the peak.
        metrics["mem.held_before_load_gb"] = window.baseline / 1e9
        if window.nvml_gb is not None:
            metrics["mem.nvml_process_gb"] = window.nvml_gb
            metrics["mem.est_total_error_pct"] = (
                (est["total_gb"] - window.nvml_gb) / window.nvml_gb * 100
            )
    else:
        metrics["mem.host_peak_rss_growth_gb"] = measured
        if loading_peak is not None:
            metrics["mem.host_load_peak_gb"] = loading_peak

    measured_on = "cuda allocator" if window.on_gpu else "host RSS growth"
    plot = memory_breakdown(
        {cfg.quant.name: est},
        ctx.output("memory_budget", "capacity_gb"),
        f"estimate vs measured ({measured_on}): {measured:.3f} GB measured",
        ctx.workdir / "memory_measured.png",
        chosen=cfg.quant.name,
        measured_gb=measured,
    )
    return StageResult(
        outputs={"measured_on": measured_on, **shape, "measured_peak_gb": measured},
        metrics=metrics,
        params={"mem.measured_on": measured_on},
        artifacts=[plot],
    )
