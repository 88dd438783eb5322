"""memory_budget's ``quant=auto`` part: the bit plan for the card, its table and picture."""

from __future__ import annotations

from typing import Any

from qpipe.backends import get_backend
from qpipe.evaluation.layer_kl import prior_sensitivity
from qpipe.memory.bitplan import plan_for_budget, plan_table
from qpipe.memory.budget_inputs import BudgetInputs
from qpipe.plots.plans import bit_plan_plot
from qpipe.stages.base import StageContext


def auto_plan(ctx: StageContext, inputs: BudgetInputs, usable_gb: float) -> dict[str, Any]:
    """The plan for a card with ``usable_gb`` (measured sensitivity when the sensitivity stage
    ran, else the prior) with its estimate, outputs, metrics and artifacts."""
    rules, measured, inventory = inputs.rules(), inputs.measured, inputs.inventory
    missing = [n for n in rules.targets if not measured or n not in measured]
    source = "measured" if not missing else "prior"
    table = measured if not missing else prior_sensitivity(inventory, rules.targets)
    quant = inputs.quant
    backend = get_backend(quant["method"])  # its format is the rounding method's
    fmt = backend.weight_format(quant, inputs.dtype_bytes, inputs.device, inputs.kernel)
    bits, plan, est = plan_for_budget(
        inventory,
        rules,
        table,
        source,
        quant,
        fmt,
        inputs.dims,
        inputs.workload,
        inputs.dtype_bytes,
        inputs.runtime_gb,
        usable_gb,
        device=inputs.device,
    )
    shapes = {m.name: m.weight_shape for m in inventory.linears()}
    table_path = ctx.workdir / "bit_plan.md"
    table_path.write_text(plan_table(bits, shapes))
    name = ctx.cfg.model.name
    picture = bit_plan_plot(
        bits.bits,
        ctx.workdir / "bit_plan.png",
        f"{name} quant=auto on {ctx.cfg.hardware.name}: "
        + ", ".join(f"{n}×{b}-bit" for b, n in bits.counts.items())
        + f" ({source} sensitivity)",
    )
    metrics = {f"auto.layers_{b}bit": float(n) for b, n in bits.counts.items()}
    metrics.update(
        {
            "auto.predicted_kl": bits.predicted_loss,
            "auto.budget_gb": bits.budget_bytes / 1e9,
            "auto.planned_layers_gb": bits.planned_bytes / 1e9,
        }
    )
    return {
        "estimate": est,
        "bit_plan": bits.as_dict(),
        "precision_plan": plan.as_dict(),
        "metrics": metrics,
        "artifacts": [table_path, picture],
    }
