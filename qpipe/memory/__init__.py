"""Memory estimation from a model's config alone."""

from qpipe.memory.dims import ArchDims, arch_dims
from qpipe.memory.estimator import (
    Estimate,
    KernelFacts,
    VisionDims,
    Workload,
    adamw_training_gb,
    estimate,
    quantized_matmuls,
    weights_gb,
)
from qpipe.memory.formats import DenseFormat, WeightFormat
from qpipe.memory.inventory import Inventory, build_inventory, inventory_of

__all__ = [
    "ArchDims",
    "DenseFormat",
    "Estimate",
    "Inventory",
    "KernelFacts",
    "VisionDims",
    "Workload",
    "adamw_training_gb",
    "arch_dims",
    "build_inventory",
    "estimate",
    "inventory_of",
    "quantized_matmuls",
    "WeightFormat",
    "weights_gb",
]
