"""The memory estimator: pure functions of a model inventory, a precision plan and a workload.

Units: bytes inside, decimal GB (1e9 bytes) in reports, as GPU vendors count memory on the
box and as the stable metric names (``mem.*_gb``) expect.

What is counted, and why it is a good predictor of the allocator's peak:
- weights, module by module, in the format each module will really have after loading:
  high-precision modules at the run's dtype; quantized Linear layers as their backend's
  ``WeightFormat`` says (packed payload plus side tensors: scales, zero points, absmax);
- the KV cache for ``batch_size × context_len`` tokens;
- the largest transient of one forward pass over the prompt (the MLP's intermediates dominate
  for decoders at batch 1; the last position's fp32 logits ride on top), plus what the
  format's own matmul holds while it runs;
- fine-tuning (``workload.mode=finetune`` without a plan): full fine-tuning with AdamW as
  ``qpipe.memory.training`` prices it (the fine-tuning plans are priced there);
- a runtime overhead (CUDA context + library workspaces) that depends on the device, taken
  from the ``hardware`` config: the allocator never sees it, the process does;
- on a GPU, the caching allocator's reserve at the peak (``allocator_reserve_bytes``): memory
  the process holds from the driver but the allocator cannot hand out at that moment.
``total_gb`` = peak + reserve + runtime is what NVML (nvidia-smi) shows for the process.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from qpipe.memory import training
from qpipe.memory.dims import ArchDims
from qpipe.memory.formats import WeightFormat
from qpipe.memory.inventory import Inventory, ModuleInfo

if TYPE_CHECKING:
    from qpipe.memory.exclusion import PrecisionPlan

GB = 1e9


def weights_gb(n_params: float, bits: float) -> float:
    """Payload of ``n_params`` weights at ``bits`` each, in GB (no format overhead)."""
    return n_params * bits / 8 / GB


def adamw_training_gb(n_params: float) -> float:
    """Full fine-tuning with AdamW in fp32: weights + gradients + two moments = 16 B/param."""
    return n_params * 16 / GB


def _module_weight_bytes(
    module: ModuleInfo, fmt: WeightFormat | None, bits: int, dtype_bytes: int
) -> tuple[int, int]:
    """(payload-equivalent bytes, format overhead bytes) of one module; ``fmt`` None: the
    module stays in the run's dtype."""
    if fmt is None:
        return module.numel * dtype_bytes, 0
    weight = math.prod(module.weight_shape)
    bias = module.numel - weight
    packed = fmt.linear_bytes(module.weight_shape, bits)
    payload = math.ceil(weight * bits / 8)
    return payload + bias * dtype_bytes, packed - payload


@dataclass(frozen=True)
class VisionDims:
    """One image through a VLM: how many tiles it makes and what each costs."""

    tiles: int
    tokens_per_tile: int  # language-model tokens a tile becomes (after the pixel shuffle)
    patches_per_tile: int  # vision-tower tokens a tile is (without the class token)
    hidden: int
    intermediate: int
    tile_side: int
    projector_in: int  # the pixel-shuffled width the projector reads (hidden / ratio²)
    lm_hidden: int

    @property
    def image_tokens(self) -> int:
        """Tokens the image occupies in the context: the tiles' tokens between <img> and
        </img>."""
        return self.tiles * self.tokens_per_tile + 2


def vision_activation_bytes(v: VisionDims, dtype_bytes: int) -> int:
    """Largest transient of encoding one image: the processor's fp32 pixels and their cast
    copy, plus the vision tower's widest layer over every tile at once (the MLP: SDPA keeps no
    score matrix) on top of its residual stream, or the projector's pixel-shuffled input and
    output, whichever is larger."""
    tokens = v.tiles * (v.patches_per_tile + 1)
    pixels = v.tiles * 3 * v.tile_side**2 * (4 + dtype_bytes)
    layer = tokens * (v.intermediate + 2 * v.hidden) * dtype_bytes
    lm_tokens = v.tiles * v.tokens_per_tile
    projector = lm_tokens * (2 * v.projector_in + 2 * v.lm_hidden) * dtype_bytes
    return pixels + max(layer, projector)


@dataclass(frozen=True)
class KernelFacts:
    """What qpipe's own kernels add while the model runs (the memory_budget stage fills it in
    from ``kernels/``): the estimator stays a pure function of what it is handed."""

    # q/k/v and gate/up as one matmul each (kernels/fusion.py): the MLP's fused [s, 2I]
    # output lives until the product is made, one more [s, I] than three separate matmuls
    fused_projections: bool = False
    # the autotuner's cold copies of one layer's weights (kernels/tuning.py), made the first
    # time a layer shape runs in the process: during the workload's prefill or first step
    tuning_bytes: int = 0


# The caching allocator's reserve at the peak, as a share of the largest transient. The prompt's
# transients are freed and re-requested in other sizes layer after layer (attention, then the
# MLP; the vision tower, then the language model); the blocks the allocator split or rounded
# for them stay reserved while the peak's requests need fresh segments. Measured (reserved peak
# - allocated peak) / activations on an H100 and an H200: Qwen3-8B 2048 tokens bf16 0.50, W4
# 0.55 (bench/results/pipeline_qwen3_8b_h100.json); InternVL3.5-8B 4096 tokens + image bf16
# 0.65, nf4 and W4 0.75 (bench/results/pipeline_internvl_h200.json). Priced at the top of that range:
# a verdict must not say "fits" for a card a few hundred MB too small.
RESERVE_PER_TRANSIENT = 0.75


def allocator_reserve_bytes(activation_bytes: int, device: str) -> int:
    """What the GPU caching allocator reserves beyond what is allocated at the peak (0 off a
    GPU: host memory is measured as the process's resident set, with freed memory returned)."""
    if not device.startswith("cuda"):
        return 0
    return int(RESERVE_PER_TRANSIENT * activation_bytes)


@dataclass
class Workload:
    mode: str = "inference"  # inference | finetune
    batch_size: int = 1
    context_len: int = 2048


@dataclass
class Estimate:
    """Every figure in GB. ``peak_gb`` is what the allocator should see at its peak;
    ``total_gb`` adds what the process pays on top: the allocator's reserve at the peak
    (``reserve_gb``, GPU) and the runtime overhead (CUDA context, library workspaces)."""

    weights_gb: float
    weights_quantized_gb: float
    weights_high_precision_gb: float
    quant_overhead_gb: float
    buffers_gb: float
    kv_cache_gb: float
    activations_gb: float
    optimizer_gb: float
    runtime_gb: float
    peak_gb: float
    total_gb: float
    params: int
    params_quantized: int
    by_role_gb: dict[str, float] = field(default_factory=dict)
    image_tokens: int = 0  # of the context, for VLMs with an image in it
    image_kv_cache_gb: float = 0.0  # the image tokens' share of kv_cache_gb
    vision_activations_gb: float = 0.0  # encoding the image (activations_gb includes it)
    kernel_tuning_gb: float = 0.0  # the autotuner's cold weight copies (KernelFacts)
    reserve_gb: float = 0.0  # the caching allocator's reserve at the peak (GPU)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_cache_bytes(dims: ArchDims, workload: Workload, dtype_bytes: int) -> int:
    if not dims.decoder:
        return 0
    return (
        2
        * dims.layers
        * workload.batch_size
        * dims.kv_heads
        * dims.head_dim
        * workload.context_len
        * dtype_bytes
    )


def activation_bytes(
    dims: ArchDims, workload: Workload, dtype_bytes: int, fused_mlp: bool = False
) -> int:
    """Largest transient of one forward over the whole prompt (inference; fine-tuning's
    activations are priced in ``estimate``). ``fused_mlp``: gate and up as one matmul."""
    b, s, h = workload.batch_size, workload.context_len, dims.hidden
    q_dim = dims.heads * dims.head_dim
    kv_dim = dims.kv_heads * dims.head_dim
    widths = 4 if fused_mlp else 3  # act(gate), up, their product (+ the fused pair's half)
    mlp = b * s * (widths * dims.intermediate + 2 * h) * dtype_bytes
    attention = b * s * (2 * h + 2 * q_dim + 2 * kv_dim) * dtype_bytes
    logits_rows = b if dims.decoder else 0  # generate keeps only the last position's logits
    logits = logits_rows * dims.vocab * 4
    return max(mlp, attention) + logits


def estimate(
    inventory: Inventory,
    plan: PrecisionPlan,
    fmt: WeightFormat,
    dims: ArchDims,
    workload: Workload,
    dtype_bytes: int,
    runtime_gb: float = 0.0,
    vision: VisionDims | None = None,
    kernels: KernelFacts | None = None,
    device: str = "cuda",
) -> Estimate:
    """The memory a run needs, module by module, for this plan and workload. ``fmt``: how the
    plan's targets sit in memory (their backend's weight format); ``vision``: an image in the
    context (its tokens count in ``workload.context_len``); ``device``: where it runs (a GPU's
    caching allocator reserves beyond its peak; the host's memory is measured otherwise)."""
    targets = set(plan.targets)
    quantized_bytes = high_bytes = overhead = buffers = 0
    params_quantized = 0
    by_role: dict[str, float] = {}
    for module in inventory.modules:
        is_q = module.name in targets
        # A mixed plan (quant=auto) gives some targets their own bit width.
        bits = int(plan.bits.get(module.name, fmt.bits))
        payload, extra = _module_weight_bytes(module, fmt if is_q else None, bits, dtype_bytes)
        if is_q:
            quantized_bytes += payload
            params_quantized += math.prod(module.weight_shape)
        else:
            high_bytes += payload
        overhead += extra
        # Buffers (rotary tables, position ids) are small; fp32 is the conservative size.
        buffers += module.buffer_numel * 4
        by_role[module.role] = by_role.get(module.role, 0.0) + (payload + extra) / GB

    weights = quantized_bytes + high_bytes + overhead
    kernels = kernels or KernelFacts()
    kv = kv_cache_bytes(dims, workload, dtype_bytes)
    act = activation_bytes(dims, workload, dtype_bytes, kernels.fused_projections)
    if workload.mode == "inference" and targets:
        # What the format's own matmul holds over the prompt (bitsandbytes' int8 activations
        # and int32 product, FP8's quantized activations), in the widest quantized layer.
        tokens = workload.batch_size * workload.context_len
        shapes = [m.weight_shape for m in inventory.modules if m.name in targets]
        act += max(fmt.matmul_transient_bytes(shape, tokens) for shape in shapes)
    image_tokens = image_kv = vision_act = 0
    if vision is not None and workload.mode == "inference":
        image_tokens = vision.image_tokens
        per_token = kv_cache_bytes(
            dims, Workload(batch_size=workload.batch_size, context_len=1), dtype_bytes
        )
        image_kv = per_token * image_tokens
        vision_act = vision_activation_bytes(vision, dtype_bytes)
        # The image's features wait in the LM's width while the prompt is embedded.
        features = workload.batch_size * vision.tiles * vision.tokens_per_tile * dims.hidden
        act = max(act + features * dtype_bytes, vision_act)
    optimizer = 0
    if workload.mode == "finetune":  # full fine-tuning with AdamW (qpipe.memory.training)
        optimizer, act = training.full_finetune_extras(
            inventory, dims, workload.batch_size, workload.context_len, weights
        )
        kv = 0
    tuning = kernels.tuning_bytes if workload.mode == "inference" else 0
    peak = weights + buffers + kv + act + optimizer + tuning
    # measured for inference only: fine-tuning's activations are kept for backward, not freed
    # and re-requested layer after layer
    reserve = allocator_reserve_bytes(act, device) if workload.mode == "inference" else 0
    return Estimate(
        weights_gb=weights / GB,
        weights_quantized_gb=quantized_bytes / GB,
        weights_high_precision_gb=high_bytes / GB,
        quant_overhead_gb=overhead / GB,
        buffers_gb=buffers / GB,
        kv_cache_gb=kv / GB,
        activations_gb=act / GB,
        optimizer_gb=optimizer / GB,
        runtime_gb=runtime_gb,
        peak_gb=peak / GB,
        total_gb=(peak + reserve) / GB + runtime_gb,
        params=inventory.total_params,
        params_quantized=params_quantized,
        by_role_gb=by_role,
        image_tokens=image_tokens,
        image_kv_cache_gb=image_kv / GB,
        vision_activations_gb=vision_act / GB,
        kernel_tuning_gb=tuning / GB,
        reserve_gb=reserve / GB,
    )


# Sibling projections that qpipe's load stage fuses into one matmul (kernels/fusion.py).
SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def quantized_matmuls(
    inventory: Inventory, plan: PrecisionPlan, fmt: WeightFormat, fused: bool
) -> list[tuple[tuple[int, int], int]]:
    """((out, in), bytes as loaded) of every quantized matmul the model will run: each target
    Linear, or with ``fused`` each sibling group whose members are all quantized as one."""
    targets = set(plan.targets)
    by_name = {m.name: m for m in inventory.modules if m.name in targets}
    out: list[tuple[tuple[int, int], int]] = []
    done: set[str] = set()
    for name in by_name:
        if name in done:
            continue
        parent, _, leaf = name.rpartition(".")
        group = [name]
        for siblings in SIBLING_GROUPS if fused else ():
            names = [f"{parent}.{s}" if parent else s for s in siblings]
            if leaf in siblings and all(n in by_name for n in names):
                group = names
        shapes = [by_name[n].weight_shape for n in group]
        shape = (sum(sh[0] for sh in shapes), shapes[0][1])
        out.append((shape, fmt.linear_bytes(shape, int(plan.bits.get(name, fmt.bits)))))
        done.update(group)
    return out
