"""load: load the checkpoint onto the target device with the configured kernel, the sibling
projections of our 4-bit layers (q/k/v, gate/up) fused into one matmul each.

The memory window opened here stays open through validate_vram's generation, so the peak it
reports covers loading and running, as a user's process would see them; validate_vram reads
it, and the runner closes it for this stage when the run ends.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from qpipe.backends import get_backend
from qpipe.devices.measure import MemoryWindow
from qpipe.devices.peak_memory import device_map_for, loaded_weights_metrics
from qpipe.evaluation.vision import source_processor
from qpipe.kernels import layer_kernels
from qpipe.kernels.fusion import fuse_projections
from qpipe.models import load_tokenizer
from qpipe.models.checkpoints import inspect_checkpoint
from qpipe.stages.base import StageContext, StageResult


def _first_forward(model) -> None:
    """One token through the model while loading: bitsandbytes repacks its 4-bit weights
    for its CPU kernels at their first forward (a copy of every quantized weight), a one-time
    conversion that belongs to loading, not to the workload validate_vram measures."""
    import torch

    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long))


def run(ctx: StageContext) -> StageResult:
    cfg, settings = ctx.cfg, ctx.settings
    kernel = settings.kernel
    checkpoint = Path(ctx.output("quantize", "checkpoint"))
    backend = get_backend(settings.quant.method)
    # A damaged or mismatched folder is named here, before any weight is read.
    inspect_checkpoint(checkpoint, settings.model_class)
    tokenizer = load_tokenizer(cfg.model)  # before the window: it is not the model's memory
    processor = source_processor(cfg.model)  # VLMs: images go through it (None: text-only)

    # A device map from the budget (several GPUs, host offload) replaces the single device.
    device_map, device, window = device_map_for(
        ctx.output("memory_budget", "placement"), settings.device
    )
    window = window or MemoryWindow(device)
    window.start()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
        model = backend.load(
            checkpoint,
            settings.model_class,
            device,
            settings.dtype,
            kernel,
            **({"device_map": device_map} if device_map else {}),
        )
        fused = fuse_projections(model) if cfg.get("fuse_projections", True) else []
        if device == "cpu":
            _first_forward(model)
    seconds = time.perf_counter() - start
    metrics = {"time.load_model_s": seconds, "load.fused_projections": float(len(fused))}
    metrics |= loaded_weights_metrics(model)
    # What the layers run on, as loaded (a layer its kernel cannot take runs on another):
    # qpipe's own layers say; a library's (bitsandbytes, transformers) is what was resolved.
    ran = "+".join(layer_kernels(model)) or kernel
    return StageResult(
        outputs={"checkpoint": str(checkpoint), "device": device, "kernel": ran},
        params={"kernel": ran},
        metrics=metrics,
        objects={
            "model": model,
            "tokenizer": tokenizer,
            "processor": processor,
            "memory_window": window,
        },
        on_run_end=[window.close],
    )
