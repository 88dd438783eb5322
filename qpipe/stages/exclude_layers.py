"""exclude_layers: which Linear layers stay in high precision (lm_head, embeddings, vision
tower, projector, user patterns, and with ``exclude.by=sensitivity`` the most sensitive
measured layers), resolved to module names for the quantizer. With ``quant=auto`` it hands on
memory_budget's bit plan: the 16-bit layers are skipped, the others carry their bits."""

from __future__ import annotations

from collections import Counter

from omegaconf import OmegaConf

from qpipe.backends import get_backend
from qpipe.memory import build_inventory
from qpipe.memory.exclusion import PrecisionPlan, plan_precision
from qpipe.models import load_config
from qpipe.stages.base import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    cfg, settings = ctx.cfg, ctx.settings
    backend = get_backend(settings.quant.method)
    config = load_config(cfg.model)
    inventory = build_inventory(config, settings.model_class)
    budget_plan = ctx.output("memory_budget", "precision_plan")
    if backend.plans_widths and budget_plan is not None:
        plan = PrecisionPlan(**budget_plan)
    else:
        measured = (
            ctx.output("sensitivity", "layers") if ctx.output("sensitivity", "measured") else None
        )
        plan = plan_precision(
            inventory,
            OmegaConf.to_container(cfg.exclude, resolve=True),
            quantize=backend.quantizes,
            sensitivity=measured,
            # As memory_budget prices it, so that both stages keep the same layers.
            dtype_bytes=settings.budget_dtype.itemsize,
        )
    shapes = {m.name: list(m.weight_shape) for m in inventory.linears()}
    reasons = Counter(r.split(":", 1)[0] for r in plan.skip.values())
    return StageResult(
        outputs={
            "targets": plan.targets,
            "skip": plan.skip,
            "bits": plan.bits,
            "shapes": shapes,
            "skip_reasons": dict(reasons),
        },
        metrics={
            "exclude.targets": len(plan.targets),
            "exclude.skipped": len(plan.skip),
        },
    )
