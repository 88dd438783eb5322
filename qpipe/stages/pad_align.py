"""pad_align: make every target layer's shape legal for the chosen backend's format.

Reads the Linear layers to quantize and their shapes from exclude_layers, the backend's legal
group sizes and checkpoint format, and ``pad_align.mode``; returns the plan described in
``qpipe.backends.align`` (the quantize stage hands it to the backend as ``QuantizeRequest.pad_plan``).
Nothing is changed here: the plan is data, applied by the backend while it quantizes.
"""

from __future__ import annotations

from qpipe.backends import get_backend
from qpipe.backends.align import plan_alignment
from qpipe.stages.base import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    quant = ctx.settings.quant.as_dict()
    backend = get_backend(str(quant["method"]))
    targets = list(ctx.output("exclude_layers", "targets", []) or [])
    shapes = dict(ctx.output("exclude_layers", "shapes", {}) or {})
    plan = plan_alignment(
        shapes,
        targets,
        group_size=int(quant.get("group_size", 0) or 0),
        legal=backend.legal_group_sizes(quant),
        mode=str(ctx.cfg.get("pad_align", {}).get("mode", "auto")),
        fmt=backend.checkpoint_format(quant),
    )
    metrics = {
        "align.modules_changed": float(plan["modules_changed"]),
        "align.modules_total": float(plan["modules_total"]),
        "align.pad_columns": float(plan["pad_columns"]),
        "align.group_size": float(plan["group_size"]),
    }
    return StageResult(outputs=plan, metrics=metrics, params={"pad_align.mode": plan["mode"]})
