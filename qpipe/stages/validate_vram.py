"""validate_vram: run the budgeted workload on the loaded model and compare the measured peak
with the estimate. GPU: the torch allocator's peak, and NVML's peak for the process (what
nvidia-smi shows) against the estimate's total. CPU: the model's tensors plus the run's peak in
PyTorch's allocator, the resident set's growth beside it, reported as host memory, never VRAM.

Where the peak is: the prompt's forward pass. It holds the weights, the KV cache of the whole
prompt and the largest activation transient of a layer over every prompt token (the MLP's
intermediates; the vision tower's with an image) plus the last position's logits. A decode step
after it adds one token's KV and transients a few hundred times smaller. So the workload is
the budgeted context as a prompt of ``context_len - PEAK_DECODE_STEPS`` tokens and that many
greedy steps: the KV cache ends at ``context_len`` tokens, as priced, and the steps' own
transients are measured too, without decoding 32 tokens eagerly (on a GPU, the first run of a
4-bit model tunes its kernels for each new shape; the decode shape is among them).
docs/memory.md says why this measures the same peak; tests/test_peak_workload.py shows it.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from qpipe.corpora.texts import read_text, token_ids
from qpipe.devices.measure import MemoryWindow
from qpipe.devices.peak_memory import per_device_metrics
from qpipe.evaluation.vision import count_image_tokens, load_image, workload_inputs
from qpipe.kernels.tuning import TUNER
from qpipe.plots.memory import memory_breakdown
from qpipe.stages.base import StageContext, StageResult

# Greedy steps after the prompt: enough to measure a decode step's own transients (and, on a
# GPU, to tune the kernels for the decode shape), few enough that the prompt is the budget.
PEAK_DECODE_STEPS = 4


def generate_to_context(model, inputs: dict, new_tokens: int, pad_token_id: int = 0) -> None:
    """The prompt (``inputs``), then ``new_tokens`` greedy steps: transformers' ``generate``
    with its dynamic KV cache, as a user's process runs it."""
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )


def _run_workload(
    model, tokenizer, processor, ctx: StageContext, device: str, decode_steps: int
) -> dict[str, int]:
    """The workload the budget priced: batch × context_len tokens (prompt + ``decode_steps``
    generated), the image among them for VLMs."""
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
    new = min(decode_steps, context - 1)
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
    generate_to_context(model, inputs, new, tokenizer.pad_token_id or 0)
    image_tokens = count_image_tokens(processor, inputs) if processor is not None else 0
    return {"prompt_tokens": prompt, "new_tokens": new, "image_tokens": image_tokens}


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    model = ctx.obj("load", "model")
    tokenizer = ctx.obj("load", "tokenizer")
    window: MemoryWindow = ctx.obj("load", "memory_window")
    device = ctx.output("load", "device")
    loading_peak = window.split_host_peak()
    if isinstance(window, MemoryWindow) and not window.on_gpu:
        window.track_tensors(model)  # the running phase: the model's tensors + the run's
    processor = ctx.inputs["load"].objects.get("processor")
    tuning = replace(TUNER.stats)
    start = time.perf_counter()
    shape = _run_workload(model, tokenizer, processor, ctx, device, PEAK_DECODE_STEPS)
    workload_s = time.perf_counter() - start
    phases = window.phases_gb() if isinstance(window, MemoryWindow) and window.on_gpu else {}
    window.read()  # load opened it and closes it at the run's end (see qpipe.stages.load)
    window.close()  # ...and its samplers stop here: the benchmark's timings run without them
    tuning_s = TUNER.stats.seconds - tuning.seconds

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
        "time.workload_s": workload_s,
        "time.kernel_tuning_validate_s": tuning_s,
        **per_device,
        **phases,
    }
    loaded = ctx.inputs["load"].metrics["mem.loaded_weights_gb"]
    metrics["mem.weights_error_pct"] = (est["weights_gb"] - loaded) / loaded * 100
    if window.on_gpu:
        metrics.update(_gpu_total_metrics(window, est))
    else:
        # What the OS shows beside what was priced: the resident set's growth from before
        # loading to the running peak (freed memory returned, see return_freed_host_memory).
        rss = window.growth_gb
        metrics["mem.host_peak_rss_growth_gb"] = rss
        if rss > 0:
            metrics["mem.est_host_rss_error_pct"] = (est["peak_gb"] - rss) / rss * 100
        if loading_peak is not None:
            metrics["mem.host_load_peak_gb"] = loading_peak

    measured_on = _measured_on(window)
    plot = memory_breakdown(
        {cfg.quant.name: est},
        ctx.output("memory_budget", "capacity_gb"),
        f"estimate vs measured ({measured_on}): {measured:.3f} GB measured",
        ctx.workdir / "memory_measured.png",
        chosen=cfg.quant.name,
        measured_gb=measured,
    )
    return StageResult(
        outputs={
            "measured_on": measured_on,
            **shape,
            "measured_peak_gb": measured,
            # the 4-bit kernels tuned for the workload's shapes (benchmark adds its own)
            "kernel_tuning_s": tuning_s,
            "tuned_shapes": TUNER.stats.tuned - tuning.tuned,
            "tuned_shapes_reused": TUNER.stats.from_disk - tuning.from_disk,
        },
        metrics=metrics,
        params={"mem.measured_on": measured_on},
        artifacts=[plot],
    )


def _gpu_total_metrics(window, est: dict) -> dict[str, float]:
    """The process's total on the GPU as NVML saw it at its peak, against the estimate's total
    (``mem.est_total_error_pct``), and where the bytes beyond the allocator's peak went: the
    allocator's reserve, the CUDA context with its modules, what was allocated before load."""
    metrics = {
        "mem.reserved_peak_gb": window.reserved_peak / 1e9,
        # Nonzero means an earlier stage still holds GPU memory (the libraries' workspaces
        # from env_check are in it too); it is left out of the peak, inside NVML's total.
        "mem.held_before_load_gb": window.baseline / 1e9,
    }
    if isinstance(window, MemoryWindow):
        metrics["mem.reserve_at_peak_gb"] = max(window.reserved_peak - window.peak, 0) / 1e9
    if window.nvml_gb is not None:
        metrics["mem.nvml_process_gb"] = window.nvml_gb
        metrics["mem.est_total_error_pct"] = (
            (est["total_gb"] - window.nvml_gb) / window.nvml_gb * 100
        )
        now = getattr(window, "nvml_now_gb", None)
        if now is not None:  # NVML beyond the allocator's segments: context + modules
            metrics["mem.context_gb"] = now - window.reserved_now / 1e9
    return metrics


def _measured_on(window) -> str:
    if window.on_gpu:
        return "cuda allocator"
    if isinstance(window, MemoryWindow) and window.measures_tensors:
        return "host tensors"
    return "host RSS growth"
