"""What the memory budget prices with, resolved once per run (the memory_budget stage builds it
from the config and the earlier stages' outputs): the model's inventory and dimensions, the
workload, the dtype and device the plan is for, the exclude rules and the card's memory.

Every planner of the budget (each quant option's estimate, ``quant=auto``'s bit plan, the
device map, quantizing on the GPU) takes this one object, so that they cannot disagree on a
value passed to one and not to another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qpipe.memory.dims import ArchDims
from qpipe.memory.estimator import VisionDims, Workload
from qpipe.memory.exclusion import PrecisionPlan, plan_precision
from qpipe.memory.formats import WeightFormat
from qpipe.memory.inventory import Inventory


@dataclass(frozen=True)
class BudgetInputs:
    model_config: Any  # the transformers config: the device map's meta skeleton is built from it
    model_class: str
    inventory: Inventory
    dims: ArchDims
    workload: Workload
    dtype_bytes: int
    # a named GPU is planned as "cuda" wherever qpipe runs (plan a 24 GB card from a laptop)
    device: str
    kernel: str  # the chosen option's matmul on that device (its backend resolved it)
    runtime_gb: float
    quant: dict[str, Any]  # the chosen option
    weight_format: WeightFormat  # how the chosen option's quantized layers sit in memory
    quantizes: bool  # the chosen option changes the weights at all (quant=none does not)
    exclude: dict[str, Any]
    measured: dict[str, dict[str, float]] | None  # the sensitivity stage's, when it measured
    vision: VisionDims | None  # a VLM's image in the workload's context
    capacity_gb: float  # of one card (the first, when cards differ), or of the host

    def rules(self, quantizes: bool | None = None) -> PrecisionPlan:
        """The modules an option that ``quantizes`` (the chosen option's by default) rounds,
        by the exclude rules; an option that quantizes nothing rounds none."""
        quantized = self.quantizes if quantizes is None else quantizes
        return plan_precision(
            self.inventory, self.exclude, quantized, self.measured, self.dtype_bytes
        )
