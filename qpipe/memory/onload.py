"""GPU memory for quantizing with llm-compressor when the model stays in host memory.

llm-compressor 0.14's calibration pipelines (``sequential`` for GPTQ/AWQ, ``datafree`` for
RTN) call ``compressed_tensors.offload.set_onload_device(model, cuda)``: a model left on the
CPU is offloaded there module by module and each module is copied to the GPU only while it
runs. The sequential pipeline runs the model one subgraph at a time (one decoder layer; the
embeddings before the first, the final norm and lm_head after the last), holding that
subgraph's weights on the GPU for its calibration pass (``disable_offloading``), and keeps the
activations between subgraphs in host memory (``sequential_offload_device=cpu``).

So quantizing needs, on the GPU, about:
- the largest subgraph's weights at the run's dtype;
- GPTQ: one fp32 Hessian (``in_features²``) for every quantized Linear of a layer, all alive
  while that layer is calibrated;
- AWQ: the cached outputs of the layer for every calibration sample, kept for the grid search;
- one batch's activations through a layer (the MLP's intermediates), and the last subgraph's
  logits for one sample.
The CUDA context comes on top, as for every GPU figure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from qpipe.memory.dims import ArchDims
from qpipe.memory.estimator import GB
from qpipe.memory.inventory import Inventory
from qpipe.memory.placement import layer_index

if TYPE_CHECKING:
    from qpipe.memory.exclusion import PrecisionPlan


@dataclass(frozen=True)
class CalibrationMemory:
    """What a method keeps on the GPU while llm-compressor calibrates one layer (its backend
    states it): GPTQ one fp32 Hessian ``in_features²`` per quantized Linear of the layer; AWQ
    the layer's outputs for every calibration sample, for its grid search."""

    hessians: bool = False
    layer_outputs: bool = False


@dataclass
class OnloadEstimate:
    """GB on the GPU while llm-compressor quantizes a model kept in host memory."""

    subgraph_weights_gb: float
    hessians_gb: float
    cached_outputs_gb: float
    activations_gb: float
    runtime_gb: float
    total_gb: float
    largest_subgraph: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize_onload(
    inventory: Inventory,
    plan: PrecisionPlan,
    calibration: CalibrationMemory,
    dims: ArchDims,
    samples: int,
    seq_len: int,
    dtype_bytes: int,
    runtime_gb: float,
) -> OnloadEstimate:
    """The GPU memory llm-compressor's layer-by-layer onloading needs for a method that keeps
    ``calibration`` while it calibrates a layer."""
    targets = set(plan.targets)
    subgraphs: dict[str, int] = {}
    hessians: dict[str, int] = {}
    for module in inventory.modules:
        if module.role in ("vision", "projector"):  # text calibration never runs them
            continue
        index = layer_index(module)
        if index is not None:
            key = f"layer {index}"
        elif module.role in ("lm_head",) or (module.role == "norm" and subgraphs):
            key = "head"
        else:
            key = "embeddings"
        subgraphs[key] = subgraphs.get(key, 0) + module.numel * dtype_bytes
        if calibration.hessians and module.name in targets and module.weight_shape:
            hessians[key] = hessians.get(key, 0) + module.weight_shape[1] ** 2 * 4
    largest = max(subgraphs, key=lambda k: subgraphs[k] + hessians.get(k, 0))
    weights = subgraphs[largest]
    hessian = hessians.get(largest, 0)
    tokens = seq_len  # one calibration sample per batch
    mlp = tokens * (3 * dims.intermediate + 2 * dims.hidden) * dtype_bytes
    logits = tokens * dims.vocab * dtype_bytes
    cached = samples * seq_len * dims.hidden * dtype_bytes if calibration.layer_outputs else 0
    activations = max(mlp, logits if largest == "head" else 0)
    total = (weights + hessian + cached + activations) / GB + runtime_gb
    return OnloadEstimate(
        subgraph_weights_gb=weights / GB,
        hessians_gb=hessian / GB,
        cached_outputs_gb=cached / GB,
        activations_gb=activations / GB,
        runtime_gb=runtime_gb,
        total_gb=total,
        largest_subgraph=largest,
    )
