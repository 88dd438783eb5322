"""Which Linear layers get quantized and which stay in high precision: by rule, and (with
``exclude.by: sensitivity``) the most sensitive layers measured by the sensitivity stage.

One pure function serves both the memory budget (to price the plan before any weight loads)
and the exclude_layers stage (which hands the resolved names to the quantizer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qpipe.errors import ConfigError
from qpipe.memory.inventory import Inventory

# Role of a module → the ``exclude`` switch that keeps it in high precision.
_ROLE_SWITCH = {
    "lm_head": "lm_head",
    "embedding": "embeddings",
    "vision": "vision_tower",
    "projector": "projector",
}


@dataclass
class PrecisionPlan:
    """targets: Linear layers to quantize. skip: Linear layers kept in high precision, each with
    the rule that kept it. Non-Linear modules (norms, embeddings, convs) are never quantized
    by the weight-only methods qpipe runs, so they are not listed."""

    targets: list[str] = field(default_factory=list)
    skip: dict[str, str] = field(default_factory=dict)
    bits: dict[str, int] = field(default_factory=dict)  # per-target widths of a mixed plan

    def as_dict(self) -> dict[str, Any]:
        return {"targets": self.targets, "skip": self.skip, "bits": self.bits}


EXCLUDE_BY = ("rules", "sensitivity")


def validate_exclude(exclude: dict[str, Any]) -> None:
    """One-line ConfigError for a bad ``exclude`` value (cheap)."""
    by = exclude.get("by", "rules")
    if by not in EXCLUDE_BY:
        raise ConfigError(f"exclude.by={by!r} is not valid; use {' or '.join(EXCLUDE_BY)}")
    k = exclude.get("keep_top_k", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ConfigError(f"exclude.keep_top_k={k!r} is not valid; use an integer >= 0")
    gb = exclude.get("keep_budget_gb", 0)
    if isinstance(gb, bool) or not isinstance(gb, int | float) or gb < 0:
        raise ConfigError(f"exclude.keep_budget_gb={gb!r} is not valid; use a number >= 0")
    if by == "rules" and (k or gb):
        raise ConfigError(
            "exclude.keep_top_k / exclude.keep_budget_gb keep the most sensitive layers: "
            "set exclude.by=sensitivity too"
        )


def _compile(patterns: list[str]) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ConfigError(
                f"exclude.patterns entry {pattern!r} is not a valid regex ({err})"
            ) from None
    return compiled


def plan_precision(
    inventory: Inventory,
    exclude: dict[str, Any],
    quantize: bool,
    sensitivity: dict[str, dict[str, float]] | None = None,
    dtype_bytes: int | None = None,
) -> PrecisionPlan:
    """Split the model's Linear layers into quantized targets and high-precision skips.
    ``sensitivity`` ({layer: {"kl": ...}}) is used with ``exclude.by=sensitivity``: the
    ``keep_top_k`` most sensitive targets, or as many as ``keep_budget_gb`` of their weights
    in ``dtype_bytes`` allow, stay in high precision."""
    plan = PrecisionPlan()
    if not quantize:
        plan.skip = {m.name: "quant=none" for m in inventory.linears()}
        return plan
    patterns = _compile(list(exclude.get("patterns") or []))
    for module in inventory.linears():
        if module.tied:
            # Quantizing a weight shared with the embedding would quantize the embedding too.
            plan.skip[module.name] = "tied to the input embeddings"
            continue
        switch = _ROLE_SWITCH.get(module.role)
        if switch and exclude.get(switch, True):
            plan.skip[module.name] = f"exclude.{switch}"
            continue
        hit = next((p.pattern for p in patterns if p.search(module.name)), None)
        if hit:
            plan.skip[module.name] = f"exclude.patterns: {hit}"
            continue
        plan.targets.append(module.name)
    if exclude.get("by", "rules") == "sensitivity":
        _keep_sensitive(plan, inventory, exclude, sensitivity, dtype_bytes)
    if not plan.targets:
        raise ConfigError(
            "the exclude rules keep every Linear layer in high precision, nothing to quantize; "
            "relax exclude.* or use quant=none"
        )
    return plan


def _keep_sensitive(
    plan: PrecisionPlan,
    inventory: Inventory,
    exclude: dict[str, Any],
    sensitivity: dict[str, dict[str, float]] | None,
    dtype_bytes: int | None,
) -> None:
    k = int(exclude.get("keep_top_k") or 0)
    budget = float(exclude.get("keep_budget_gb") or 0) * 1e9
    if not (k or budget):
        return
    if not sensitivity:
        raise ConfigError(
            "exclude.by=sensitivity needs the sensitivity stage's measurement; this pipeline "
            "has none (add the sensitivity stage, e.g. pipeline=default)"
        )
    size = dtype_bytes or inventory.param_dtype_bytes
    numel = {m.name: m.numel for m in inventory.linears()}
    order = sorted(
        (n for n in plan.targets if n in sensitivity),
        key=lambda n: (-float(sensitivity[n]["kl"]), n),
    )
    kept, spent = [], 0.0
    for rank, name in enumerate(order, 1):
        if k and len(kept) >= k:
            break
        cost = numel[name] * size
        if budget and spent + cost > budget:
            continue
        kept.append(name)
        spent += cost
        plan.skip[name] = f"exclude.by=sensitivity: rank {rank} (KL {sensitivity[name]['kl']:.3g})"
    plan.targets = [n for n in plan.targets if n not in set(kept)]
