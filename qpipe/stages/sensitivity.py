"""sensitivity: measure how much quantizing each Linear layer alone hurts (KL divergence of the
next-token distribution on calibration text, RTN at the target bits), for
``exclude.by=sensitivity`` and ``quant=auto``. Cached: the measurement loads the model and runs
one forward per layer. Skipped (instantly) when nothing asks for it."""

from __future__ import annotations

import time

from omegaconf import OmegaConf

from qpipe.backends import get_backend
from qpipe.corpora.calibration import load_calib_texts
from qpipe.evaluation.layer_kl import (
    calibration_batch,
    log_progress,
    measure_sensitivity,
    ranking,
)
from qpipe.memory import build_inventory
from qpipe.memory.exclusion import plan_precision
from qpipe.models import load_config, load_tokenizer, materialize
from qpipe.plots.plans import sensitivity_plot
from qpipe.stages.base import StageContext, StageResult


def skip_reason(cfg) -> str | None:
    """Why the measurement is not needed (None: it is)."""
    backend = get_backend(cfg.quant.method)
    if not backend.quantizes:
        return f"quant={cfg.quant.name} quantizes nothing"
    if cfg.exclude.get("by", "rules") != "sensitivity" and not backend.plans_widths:
        return "exclude.by=rules and quant is not auto"
    if cfg.model.get("weights") == "random":
        return "random weights: a measurement would be noise (the plan uses the prior)"
    return None


def measured_layers(cfg, model_class: str) -> list[str]:
    """Every Linear layer the name rules would quantize (what sensitivity can move)."""
    config = load_config(cfg.model)
    inventory = build_inventory(config, model_class)
    rules = {**OmegaConf.to_container(cfg.exclude, resolve=True), "by": "rules"}
    rules.update(keep_top_k=0, keep_budget_gb=0)
    return plan_precision(inventory, rules, quantize=True).targets


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    reason = skip_reason(cfg)
    if reason:
        return StageResult(outputs={"measured": False, "reason": reason}, cacheable=False)
    from qpipe.backends.qlinear_loader import auto_class

    settings = ctx.settings
    bits = settings.quant.bits
    group_size = settings.quant.group_size
    symmetric = bool(settings.quant.options.get("symmetric", True))
    layers = measured_layers(cfg, settings.model_class)
    tokenizer = load_tokenizer(cfg.model)
    ids = calibration_batch(
        tokenizer,
        load_calib_texts(OmegaConf.to_container(cfg.calib, resolve=True)),
        int(cfg.sensitivity.samples),
        int(cfg.sensitivity.seq_len),
    )
    model_cls = auto_class(settings.model_class)
    model = model_cls.from_pretrained(materialize(cfg.model), dtype=settings.dtype)
    model = model.to(settings.device)
    start = time.perf_counter()
    table = measure_sensitivity(
        model,
        ids,
        layers,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        progress=log_progress(),
    )
    seconds = time.perf_counter() - start
    order = ranking(table)
    plot = sensitivity_plot(
        table,
        ctx.workdir / "sensitivity.png",
        f"{cfg.model.name}: KL with one layer at {bits} bits (RTN g{group_size}), "
        f"{ids.numel()} tokens",
    )
    return StageResult(
        outputs={
            "measured": True,
            "metric": "kl",
            "bits": bits,
            "group_size": group_size,
            "symmetric": symmetric,
            "tokens": int(ids.numel()),
            "layers": table,
            "ranking": order,
        },
        metrics={
            "sensitivity.layers": float(len(table)),
            "sensitivity.tokens": float(ids.numel()),
            "sensitivity.kl_max": float(table[order[0]]["kl"]) if order else 0.0,
            "sensitivity.kl_sum": float(sum(v["kl"] for v in table.values())),
            "time.sensitivity_measure_s": seconds,
        },
        artifacts=[plot],
    )
