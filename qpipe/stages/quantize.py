"""quantize: call the chosen backend and save a loadable checkpoint with its recipe.

Random weights go to the backends that take a model in memory (llm-compressor's GPTQ, AWQ,
RTN) without a round trip through the disk: built on the device, handed over, dropped after.
The checkpoint they make is cached like any other (the ``model`` config, seed and dtype in
the stage's cache key define the weights)."""

from __future__ import annotations

import gc
import time
from pathlib import Path

from qpipe.backends import Backend, QuantizeRequest, get_backend
from qpipe.devices.measure import MemoryWindow
from qpipe.models import materialize, model_files, random_model
from qpipe.models.source import source_kind
from qpipe.stages.base import StageContext, StageResult
from qpipe.store.diskspace import guarded_write


def _calibration(cfg, backend: Backend, quant: dict) -> tuple[list[str], int, int]:
    """Calibration texts for the methods that need them (GPTQ, AWQ)."""
    if not backend.needs_calibration(quant) or "calib" not in cfg:
        return [], 0, 0
    from qpipe.backends.llmc import calibration_texts

    return calibration_texts(cfg.calib), int(cfg.calib.seq_len), int(cfg.calib.num_samples)


def _checkpoint_bytes(ctx: StageContext, backend: Backend) -> int:
    """What the checkpoint will take on disk: the budget's estimate of the quantized weights
    (0 for quant=none, whose checkpoint is the source folder)."""
    if not backend.quantizes:
        return 0
    estimate = ctx.output("memory_budget", "estimate") or {}
    return int(float(estimate.get("weights_gb", 0)) * 1e9)


def run(ctx: StageContext) -> StageResult:
    cfg, settings = ctx.cfg, ctx.settings
    quant = settings.quant.as_dict()
    backend = get_backend(settings.quant.method)
    layer_by_layer = bool((ctx.output("memory_budget", "quantize") or {}).get("layer_by_layer"))
    in_memory = (
        source_kind(cfg.model) == "random"
        and getattr(backend, "reads_model_in_memory", False)
        and not layer_by_layer  # a model larger than the GPU waits in host memory: read it
    )
    source = model_files(cfg.model) if in_memory else materialize(cfg.model)
    texts, seq_len, samples = _calibration(cfg, backend, quant)
    output_dir = ctx.workdir / "checkpoint"
    output_dir.mkdir(parents=True, exist_ok=True)
    request = QuantizeRequest(
        source=source,
        model_class=settings.model_class,
        quant=quant,
        skip_modules=sorted(ctx.output("exclude_layers", "skip", {})),
        targets=list(ctx.output("exclude_layers", "targets", [])),
        bits_by_module=dict(ctx.output("exclude_layers", "bits", {}) or {}),
        output_dir=output_dir,
        device=settings.device,
        dtype=settings.dtype,
        pad_plan=ctx.inputs["pad_align"].outputs if "pad_align" in ctx.inputs else {},
        calib_texts=texts,
        calib_seq_len=seq_len or 512,
        calib_samples=samples or 64,
        keep_in_host=layer_by_layer,
    )
    window = MemoryWindow(settings.device).start()
    start = time.perf_counter()
    try:
        if in_memory:
            request.model = random_model(cfg.model, settings.device, settings.dtype)
        with guarded_write(
            output_dir, _checkpoint_bytes(ctx, backend), f"the {quant['name']} checkpoint"
        ):
            result = backend.quantize(request)
    finally:
        request.model = None  # the quantized model must not outlive the stage (load measures)
        gc.collect()
    seconds = time.perf_counter() - start
    window.stop()

    artifacts: list[Path] = []
    if result.recipe is not None and Path(result.recipe).is_file():
        artifacts.append(Path(result.recipe))
    metrics = {"time.quantize_compute_s": seconds, "mem.quantize_peak_gb": window.used_gb}
    metrics.update(
        {f"quantize.{k}": v for k, v in result.details.items() if isinstance(v, int | float)}
    )
    return StageResult(
        outputs={
            "checkpoint": str(result.checkpoint),
            "format": result.format,
            "source": str(source),
            "source_in_memory": in_memory,
            "recipe": str(result.recipe) if result.recipe else None,
            "details": result.details,
        },
        metrics=metrics,
        params={
            "quant.method": quant["method"],
            "quant.bits": quant.get("bits"),
            "quant.group_size": quant.get("group_size"),
            "quant.format": result.format,
        },
        artifacts=artifacts,
    )
