"""quantize: call the chosen backend and save a loadable checkpoint with its recipe."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from qpipe.backends import QuantizeRequest, get_backend
from qpipe.config.compose import resolve_device, resolve_dtype
from qpipe.devices.measure import MemoryWindow
from qpipe.models import materialize
from qpipe.stages.base import StageContext, StageResult
from qpipe.store.diskspace import guarded_write


def _calibration(cfg) -> tuple[list[str], int, int]:
    """Calibration texts for the methods that need them (GPTQ, AWQ)."""
    method = cfg.quant.get("algorithm") if cfg.quant.method == "auto" else cfg.quant.method
    if method not in ("gptq", "awq") or "calib" not in cfg:
        return [], 0, 0
    from qpipe.backends.llmc import calibration_texts

    return calibration_texts(cfg.calib), int(cfg.calib.seq_len), int(cfg.calib.num_samples)


def _checkpoint_bytes(ctx: StageContext) -> int:
    """What the checkpoint will take on disk: the budget's estimate of the quantized weights
    (0 for quant=none, whose checkpoint is the source folder)."""
    if ctx.cfg.quant.method == "none":
        return 0
    estimate = ctx.output("memory_budget", "estimate") or {}
    return int(float(estimate.get("weights_gb", 0)) * 1e9)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    quant = OmegaConf.to_container(cfg.quant, resolve=True)
    backend = get_backend(quant["method"])
    source = materialize(cfg.model)
    texts, seq_len, samples = _calibration(cfg)
    output_dir = ctx.workdir / "checkpoint"
    output_dir.mkdir(parents=True, exist_ok=True)
    request = QuantizeRequest(
        source=source,
        model_class=cfg.model.get("model_class", "AutoModelForCausalLM"),
        quant=quant,
        skip_modules=sorted(ctx.output("exclude_layers", "skip", {})),
        targets=list(ctx.output("exclude_layers", "targets", [])),
        bits_by_module=dict(ctx.output("exclude_layers", "bits", {}) or {}),
        output_dir=output_dir,
        device=device,
        dtype=dtype,
        pad_plan=ctx.inputs["pad_align"].outputs if "pad_align" in ctx.inputs else {},
        calib_texts=texts,
        calib_seq_len=seq_len or 512,
        calib_samples=samples or 64,
        keep_in_host=bool((ctx.output("memory_budget", "quantize") or {}).get("layer_by_layer")),
    )
    window = MemoryWindow(device).start()
    start = time.perf_counter()
    with guarded_write(output_dir, _checkpoint_bytes(ctx), f"the {quant['name']} checkpoint"):
        result = backend.quantize(request)
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
