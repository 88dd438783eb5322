"""exclude_layers: which Linear layers stay in high precision (lm_head, embeddings, vision
tower, projector, user patterns), resolved to module names for the quantizer."""

from __future__ import annotations

from collections import Counter

from omegaconf import OmegaConf

from qpipe.exclusion import plan_precision
from qpipe.memory import build_inventory
from qpipe.models import load_config
from qpipe.stages.base import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    config = load_config(cfg.model)
    inventory = build_inventory(config, cfg.model.get("model_class", "AutoModelForCausalLM"))
    plan = plan_precision(
        inventory,
        OmegaConf.to_container(cfg.exclude, resolve=True),
        quantize=cfg.quant.method != "none",
    )
    shapes = {m.name: list(m.weight_shape) for m in inventory.linears()}
    reasons = Counter(plan.skip.values())
    return StageResult(
        outputs={
            "targets": plan.targets,
            "skip": plan.skip,
            "shapes": shapes,
            "skip_reasons": dict(reasons),
        },
        metrics={
            "exclude.targets": len(plan.targets),
            "exclude.skipped": len(plan.skip),
        },
    )
