"""Which Linear layers get quantized and which stay in high precision, by rule.

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

    def as_dict(self) -> dict[str, Any]:
        return {"targets": self.targets, "skip": self.skip}


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


def plan_precision(inventory: Inventory, exclude: dict[str, Any], quantize: bool) -> PrecisionPlan:
    """Split the model's Linear layers into quantized targets and high-precision skips."""
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
    if not plan.targets:
        raise ConfigError(
            "the exclude rules keep every Linear layer in high precision, nothing to quantize; "
            "relax exclude.* or use quant=none"
        )
    return plan
