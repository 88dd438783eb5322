"""``quant=auto``: a bit width per Linear layer that fits the card with the least predicted loss.

Each quantizable layer may stay in high precision (16: the run's dtype) or be rounded to 8 or
4 bits. A choice costs the estimator's exact bytes for that layer (payload + scales + zero
points) and a predicted loss (``predicted_loss`` below: the layer's KL divergence
when quantized alone; losses of different layers add up to first order). The plan is a
multiple-choice knapsack: minimise the summed loss subject to the bytes fitting what the card
has left after everything that does not depend on the plan (embeddings, norms, excluded
layers, KV cache, activations, runtime). It is solved exactly by dynamic programming over the
bytes above the all-lowest-bits plan, rounded *up* to a grid: the plan always fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qpipe.errors import ConfigError, DoesNotFit
from qpipe.memory.dims import ArchDims
from qpipe.memory.estimator import GB, Estimate, Workload, estimate
from qpipe.memory.exclusion import PrecisionPlan
from qpipe.memory.formats import WeightFormat
from qpipe.memory.inventory import Inventory

CHOICES = (16, 8, 4)
HIGH = 16  # "16" is the run's dtype (bf16 on GPU, fp32 on CPU)


def predicted_loss(entry: Mapping[str, float], bits: int, lowest: int = 4) -> float:
    """Predicted KL of one layer at ``bits`` from its entry (measured at ``lowest`` bits)."""
    if bits >= 16:
        return 0.0
    if bits == lowest:
        return float(entry["kl"])
    if bits == 8 and lowest == 4:
        return float(entry["kl"]) * float(entry["noise_ratio_8"])
    raise ValueError(f"no loss model for {bits}-bit layers measured at {lowest} bits")


def validate_auto(quant: Mapping[str, Any]) -> None:
    """One-line ConfigError for a bad plan setting (cheap): its choices, its weights cap, and
    ``quant.bits`` as the lowest choice. Which method rounds the layers is its backend's to
    check."""
    choices = quant.get("choices")
    if (
        not isinstance(choices, list | tuple)
        or not choices
        or any(c not in CHOICES for c in choices)
        or len(set(choices)) != len(choices)
    ):
        raise ConfigError(
            f"quant.choices={choices!r} is not valid; use a non-empty subset of [16, 8, 4]"
        )
    budget = quant.get("weights_gb")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0
    ):
        raise ConfigError(f"quant.weights_gb={budget!r} is not valid; use null or a number > 0")
    low = min(c for c in choices)
    if int(quant.get("bits", 4)) != low:
        raise ConfigError(
            f"quant.bits={quant.get('bits')} must be the lowest of quant.choices ({low}): "
            "sensitivity is measured at it"
        )


def layer_bytes(
    shape: Sequence[int], bias: int, bits: int, fmt: WeightFormat, dtype_bytes: int
) -> int:
    """Exact bytes of one Linear (weight + bias) at ``bits`` (16 = the run's dtype) in the
    format of the method that rounds the plan's layers."""
    if bits >= HIGH:
        return math.prod(shape) * dtype_bytes + bias * dtype_bytes
    return fmt.linear_bytes(tuple(shape), bits) + bias * dtype_bytes


def solve_knapsack(
    costs: Mapping[str, Mapping[int, int]],
    losses: Mapping[str, Mapping[int, float]],
    budget: int,
    resolution: int = 1 << 16,
) -> dict[str, int] | None:
    """The choice per item minimising the summed loss with summed cost <= ``budget``; None if
    even the cheapest choices do not fit. Costs above each item's cheapest are rounded up to
    ``(budget - cheapest total) / resolution``-byte units, so the plan never overshoots."""
    names = sorted(costs)
    if not names:
        return {}
    cheapest = {n: min(costs[n].values()) for n in names}
    spare = budget - sum(cheapest.values())
    if spare < 0:
        return None
    unit = max(spare / resolution, 1.0)
    bins = int(spare // unit)
    inf = float("inf")
    best = np.full(bins + 1, 0.0)  # best[j]: least loss using at most j units
    picks = []
    for n in names:
        options = sorted(costs[n])
        new = np.full(bins + 1, inf)
        pick = np.zeros(bins + 1, dtype=np.int8)
        for k, bits in enumerate(options):
            w = math.ceil((costs[n][bits] - cheapest[n]) / unit - 1e-9)
            if w > bins:
                continue
            cand = np.full(bins + 1, inf)
            cand[w:] = best[: bins + 1 - w] + float(losses[n][bits])
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        best = new
        picks.append((n, options, pick))
    j = bins
    plan: dict[str, int] = {}
    for n, options, pick in reversed(picks):
        bits = options[int(pick[j])]
        plan[n] = bits
        j -= math.ceil((costs[n][bits] - cheapest[n]) / unit - 1e-9)
    return plan


@dataclass
class BitPlan:
    """The outcome: ``bits`` for every Linear layer the rules let the plan touch (16 = kept in
    high precision), what each costs and is predicted to lose, and the budget it met."""

    bits: dict[str, int]
    bytes: dict[str, int]
    loss: dict[str, float]
    budget_bytes: int
    fixed_bytes: int  # everything outside the planned layers (weights, KV, activations, ...)
    sensitivity_source: str  # measured | prior
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def planned_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def predicted_loss(self) -> float:
        return sum(self.loss.values())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(planned_bytes=self.planned_bytes, predicted_loss=self.predicted_loss)
        return data


def plan_bits(
    inventory: Inventory,
    layers: Sequence[str],
    sensitivity: Mapping[str, Mapping[str, float]],
    quant: Mapping[str, Any],
    fmt: WeightFormat,
    dtype_bytes: int,
    budget_bytes: int,
    fixed_bytes: int,
    source: str,
) -> BitPlan:
    """Bits per layer (from ``quant.choices``) whose bytes fit ``budget_bytes - fixed_bytes``
    with the least predicted loss. Raises DoesNotFit when the lowest bits everywhere do not."""
    choices = sorted(int(c) for c in quant["choices"])
    low = min(choices)
    info = {m.name: m for m in inventory.linears()}
    costs: dict[str, dict[int, int]] = {}
    losses: dict[str, dict[int, float]] = {}
    for name in layers:
        m = info[name]
        bias = m.numel - math.prod(m.weight_shape)
        costs[name] = {b: layer_bytes(m.weight_shape, bias, b, fmt, dtype_bytes) for b in choices}
        losses[name] = {b: predicted_loss(sensitivity[name], b, low) for b in choices}
    room = budget_bytes - fixed_bytes
    chosen = solve_knapsack(costs, losses, room)
    if chosen is None:
        need = (fixed_bytes + sum(min(c.values()) for c in costs.values())) / 1e9
        raise DoesNotFit(
            f"quant=auto: even {low}-bit everywhere needs {need:.3f} GB but the budget is "
            f"{budget_bytes / 1e9:.3f} GB"
        )
    chosen = {n: chosen[n] for n in layers}  # model order
    counts = {str(b): sum(1 for v in chosen.values() if v == b) for b in choices}
    return BitPlan(
        bits=chosen,
        bytes={n: costs[n][b] for n, b in chosen.items()},
        loss={n: losses[n][b] for n, b in chosen.items()},
        budget_bytes=int(budget_bytes),
        fixed_bytes=int(fixed_bytes),
        sensitivity_source=source,
        counts=counts,
    )


def plan_table(plan: BitPlan, shapes: Mapping[str, Sequence[int]]) -> str:
    """The plan as a Markdown table, one row per layer in model order, with a summary."""
    lines = [
        f"quant=auto plan ({plan.sensitivity_source} sensitivity): "
        + ", ".join(
            f"{n} layers at {b} bits"
            for b, n in sorted(plan.counts.items(), key=lambda kv: -int(kv[0]))
        )
        + f"; planned layers {plan.planned_bytes / 1e9:.4f} GB + rest {plan.fixed_bytes / 1e9:.4f}"
        f" GB <= budget {plan.budget_bytes / 1e9:.4f} GB; predicted KL {plan.predicted_loss:.4g}",
        "",
        "| layer | shape | bits | MB | predicted KL |",
        "|---|---|---|---|---|",
    ]
    for name, bits in plan.bits.items():
        shape = "×".join(str(v) for v in shapes.get(name, ()))
        lines.append(
            f"| {name} | {shape} | {bits} | {plan.bytes[name] / 1e6:.3f} | {plan.loss[name]:.3g} |"
        )
    return "\n".join(lines) + "\n"


def plan_for_budget(
    inventory: Inventory,
    rules: PrecisionPlan,
    sensitivity: Mapping[str, Mapping[str, float]],
    source: str,
    quant: Mapping[str, Any],
    fmt: WeightFormat,
    dims: ArchDims,
    workload: Workload,
    dtype_bytes: int,
    runtime_gb: float,
    usable_gb: float,
    device: str = "cuda",
) -> tuple[BitPlan, PrecisionPlan, Estimate]:
    """The ``quant=auto`` plan for a card with ``usable_gb`` (and ``quant.weights_gb`` as a cap
    on the weights, if set): the rules' targets get bits, the rules' skips stay as they are.
    ``fmt``: the weight format of the method that rounds the layers, at the lowest choice.
    Returns the plan, the precision plan it makes, and the estimate of that plan."""
    low = min(int(c) for c in quant["choices"])
    floor = estimate(inventory, rules, fmt, dims, workload, dtype_bytes, runtime_gb, device=device)
    info = {m.name: m for m in inventory.linears()}
    planned_low = sum(
        layer_bytes(
            info[n].weight_shape,
            info[n].numel - math.prod(info[n].weight_shape),
            low,
            fmt,
            dtype_bytes,
        )
        for n in rules.targets
    )
    fixed = round(floor.total_gb * GB) - planned_low
    budget = usable_gb * GB
    if quant.get("weights_gb") is not None:
        not_weights = (floor.total_gb - floor.weights_gb) * GB
        budget = min(budget, float(quant["weights_gb"]) * GB + not_weights)
    bits = plan_bits(
        inventory, rules.targets, sensitivity, quant, fmt, dtype_bytes, int(budget), fixed, source
    )
    plan = PrecisionPlan(
        targets=[n for n, b in bits.bits.items() if b < HIGH],
        skip={
            **rules.skip,
            **{n: "quant=auto: kept at 16" for n, b in bits.bits.items() if b >= HIGH},
        },
        bits={n: b for n, b in bits.bits.items() if b < HIGH},
    )
    est = estimate(inventory, plan, fmt, dims, workload, dtype_bytes, runtime_gb, device=device)
    return bits, plan, est
