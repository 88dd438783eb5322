"""What fine-tuning takes, per card and in host memory: pure functions of the model's inventory,
its dimensions, the fine-tuning plan (``FinetuneSettings``) and the bytes of the base weights in
their real format (which the caller takes from ``estimate()``'s weights figure for the quant the
method implies, so that the facts of every weight format stay with the inference estimator and
the backends).

Per card, in the order the allocator sees them (bytes; decimal GB in reports):
- base weights as trained: bf16/fp32 (LoRA, full), nf4 for QLoRA, with
  ``prepare_model_for_kbit_training``'s fp32 copy of every non-4-bit parameter;
- LoRA adapters (fp32 under mixed precision: peft upcasts them), gradients of what trains, the
  optimizer's states (AdamW: two moments in the parameter's dtype; 8-bit AdamW: 2 bytes a
  parameter plus a float32 absmax per 256, 8 bytes for tensors under 4096 elements; the paged
  variant holds them in managed memory, which NVML sees and the torch allocator does not);
  DeepSpeed's fp32 master weights and gradient partition, divided over the cards by ZeRO/FSDP,
  or moved to host memory by offload;
- the activations autograd saves for backward, walked tensor by tensor through a Llama/Qwen
  decoder layer with the dtypes the run really has (autocast, fp32 norms, peft's input casts,
  bitsandbytes returning its input's dtype); SDPA/flash attention saves no s² score matrix;
  with gradient checkpointing each layer keeps its input and one layer is recomputed at a time;
- the fp32 log-probabilities over the vocabulary the loss saves, and the spikes around them
  (the logits' fp32 copy in forward; the dense gradient of the log-probabilities in backward);
- the CUDA context (``runtime_gb``), which the allocator never sees.

The figures were derived from what ``torch.autograd.graph.saved_tensors_hooks`` reports on
SmolLM2/Llama and Qwen3 configs (tests/test_finetune_pricing.py checks them against it).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from qpipe.config.finetune import ALL_LINEAR, FinetuneSettings
from qpipe.errors import ConfigError
from qpipe.memory.dims import ArchDims
from qpipe.memory.inventory import Inventory, ModuleInfo

GB = 1e9
BNB_OPT_BLOCK = 256  # bitsandbytes' 8-bit optimizers: one float32 absmax per 256 states
BNB_OPT_MIN_8BIT = 4096  # smaller tensors keep 32-bit states (bitsandbytes' min_8bit_size)
BNB_QMAP_BYTES = 2 * 256 * 4  # the two 256-entry float32 quantization maps
BATCHES = (1, 2, 4, 8, 16, 32, 64)  # what the verdict tries for each plan
# The DeepSpeed plan qpipe writes (qpipe.training.launch) reduces gradients through buckets of
# this many elements with contiguous_gradients and overlap_comm: ZeRO-1/2 then hold two such
# buffers on each GPU from the first backward on (DeepSpeed's setup_buckets), in the bf16 of
# the run; DeepSpeed's own estimators leave them out.
DS_REDUCE_BUCKET = 500_000_000
DS_BUCKETS = 2
# Backward of one decoder layer: the gradients of its widest intermediates (the MLP's three
# [tokens, intermediate] tensors and two of the residual width) live together.
_BWD_MLP_WIDTHS, _BWD_HIDDEN_WIDTHS = 3, 2


@dataclass(frozen=True)
class BaseWeights:
    """The base model's bytes for one method, from ``estimate()``: as the load stage loads
    them, and as training holds them (after conversion to fp32 master weights or
    ``prepare_model_for_kbit_training``'s upcast); ``buffers`` (rotary tables) on top."""

    loaded: int
    trained: int
    buffers: int = 0
    largest_4bit_weight: int = 0  # out×in of the largest 4-bit Linear (dequantized in backward)


@dataclass(frozen=True)
class Flow:
    """The dtypes (bytes per element) the tensors of a training step have."""

    stream: int  # the residual stream (the embeddings' dtype)
    linear: int  # Linear weights: 2, 4, or 0 for bitsandbytes 4-bit (returns its input's dtype)
    norm: int  # RMSNorm weights
    head: int  # lm_head's weight
    adapter: int  # LoRA A/B
    autocast: bool  # bf16 autocast: matmuls and SDPA in bf16
    dropout_mask: int = 1  # CUDA's fused dropout keeps a bool mask; the CPU's, its input's dtype


@dataclass
class TrainingEstimate:
    """Every figure in GB, per card (host_gb: host memory of the whole node)."""

    method: str
    micro_batch: int
    seq_len: int
    checkpointing: bool
    weights_gb: float  # base weights as trained (+ buffers)
    loaded_weights_gb: float  # as the load stage leaves them
    adapters_gb: float
    trainable_params: int
    grads_gb: float
    optimizer_gb: float  # states the allocator holds
    master_gb: float  # DeepSpeed's fp32 master weights and gradient partition
    paged_gb: float  # paged optimizer states: managed memory, outside the allocator
    activations_gb: float  # saved for backward at the end of forward
    logits_gb: float  # the loss's forward spike over the vocabulary (fp32 copy + logits)
    loss_backward_gb: float  # the loss's backward spike (dense fp32 gradients)
    runtime_gb: float
    host_gb: float  # offloaded model states (+ pinned buffers), for all the node's ranks
    model_states_gb: float  # params + grads + optimizer per card (DeepSpeed's estimators' figure)
    phases_gb: dict[str, float] = field(default_factory=dict)  # forward/backward/optimizer peaks
    peak_gb: float = 0.0
    total_gb: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- what trains


def language_linears(inventory: Inventory, train_vision: bool) -> list[ModuleInfo]:
    """The Linears LoRA may adapt: the language model's blocks (and the vision tower's when
    it trains), never lm_head."""
    roles = {"block"} | ({"vision", "projector"} if train_vision else set())
    return [m for m in inventory.linears() if m.role in roles and not m.tied]


def lora_targets(inventory: Inventory, plan: FinetuneSettings) -> list[ModuleInfo]:
    """The Linears that get adapters; ConfigError naming the closest module names when a
    target matches none."""
    linears = language_linears(inventory, plan.train_vision)
    if plan.lora.targets == (ALL_LINEAR,):
        return linears
    chosen: list[ModuleInfo] = []
    leaves = sorted({m.name.rsplit(".", 1)[-1] for m in linears})
    for target in plan.lora.targets:
        hits = [m for m in linears if m.name == target or m.name.endswith("." + target)]
        if not hits:
            close = difflib.get_close_matches(target.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.3)
            near = ", ".join(close or leaves[:6])
            raise ConfigError(
                f"finetune.lora.targets: {target!r} matches no Linear of the language model; "
                f"closest module names: {near} (or {ALL_LINEAR})"
            )
        chosen.extend(m for m in hits if m not in chosen)
    return chosen


def adapter_numels(targets: list[ModuleInfo], rank: int) -> list[int]:
    """LoRA's A [r, in] and B [out, r] of every target."""
    out = []
    for m in targets:
        out_f, in_f = m.weight_shape
        out += [rank * in_f, out_f * rank]
    return out


def trainable_numels(inventory: Inventory, plan: FinetuneSettings) -> list[int]:
    """The parameter tensors that get gradients and optimizer states (full: every tensor but
    a frozen vision tower's; LoRA: the adapters)."""
    if plan.trains_adapters:
        return adapter_numels(lora_targets(inventory, plan), plan.lora.rank)
    frozen = set() if plan.train_vision else {"vision"}
    return [m.numel for m in inventory.modules if m.numel and m.role not in frozen]


def optimizer_state_bytes(numels: list[int], optimizer: str, state_bytes: int) -> int:
    """The optimizer's states for these tensors. AdamW keeps two moments in the parameter's
    dtype (``state_bytes``); 8-bit AdamW two uint8 states and a float32 absmax per block of
    256 (32-bit states under 4096 elements); SGD without momentum none."""
    if optimizer == "sgd" or not numels:
        return 0
    if optimizer == "adamw":
        return 2 * state_bytes * sum(numels)
    total = BNB_QMAP_BYTES
    for n in numels:
        if n < BNB_OPT_MIN_8BIT:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_OPT_BLOCK)
    return total


def optimizer_step_transient(
    numels: list[int], optimizer: str, device: str, param_bytes: int
) -> int:
    """What the optimizer step allocates beside its states while it runs. Fused AdamW and
    bitsandbytes' CUDA kernels update in place (nothing); bitsandbytes' CPU path updates one
    tensor at a time through float32 copies (``backends/cpu/ops.py``): both states
    dequantized, the scaled gradient, the square root of the second moment and the
    denominator made from it (5 × 4 bytes an element of the largest tensor of 8-bit states),
    and a float32 copy of a parameter that is not float32."""
    if device.startswith("cuda") or optimizer not in ("adamw_8bit", "paged_adamw_8bit"):
        return 0
    largest = max((n for n in numels if n >= BNB_OPT_MIN_8BIT), default=0)
    return (5 * 4 + (4 if param_bytes != 4 else 0)) * largest


# ---------------------------------------------------------------- activations


def flow_for(plan: FinetuneSettings, run_dtype_bytes: int, device: str = "cuda") -> Flow:
    """The dtypes of a step. ``run_dtype_bytes``: what the load stage loads (2 on GPU, 4 on
    CPU by default). DeepSpeed and FSDP run forward in bf16 over bf16 parameters (the fp32
    master copy lives in the optimizer), as pure bf16 does."""
    sharded = plan.sharding != "none"
    cuda = device.startswith("cuda")
    if plan.precision == "bf16" or (sharded and plan.precision == "mixed"):
        linear = 0 if plan.method == "qlora" else 2
        return Flow(2, linear, 2, 2, 2, False, 1 if cuda else 2)
    autocast = plan.precision == "mixed"
    mask = 1 if cuda else 4  # the CPU's mask has the adapter's input dtype (fp32 here)
    if plan.method == "full":  # the parameters are the fp32 master weights
        return Flow(4, 4, 4, 4, 4, autocast, mask)
    if plan.method == "lora":
        base = run_dtype_bytes
        return Flow(base, base, base, base, 4, autocast, mask)
    # qlora: prepare_model_for_kbit_training upcasts every non-4-bit parameter to fp32
    return Flow(4, 0, 4, 4, 4, autocast, mask)


def _out(flow: Flow, weight: int, x: int) -> int:
    """dtype of a Linear's output: bf16 under autocast, bitsandbytes 4-bit returns its input's
    dtype, else the promoted dtype of weight and input."""
    if weight == 0:
        return x
    return 2 if flow.autocast else max(weight, x)


@dataclass(frozen=True)
class _Layer:
    hidden: int
    q: int  # heads × head_dim
    kv: int
    heads: int
    kv_heads: int
    inter: int
    qk_norm: bool  # Qwen3: RMSNorm over each head's q and k


def _group(
    flow: Flow,
    members: list[str],
    width: int,
    y: int,
    y_saved: bool,
    trainable: bool,
    lora: set[str],
    rank: int,
    dropout: bool,
    input_grad: bool = True,
) -> int:
    """Bytes per token saved for the Linears that read one input of ``width`` (dtype ``y``):
    a trainable weight needs its input (cast to bf16 per call under autocast: autocast does not
    cache activations); a LoRA target saves its adapter's input (peft casts it to the
    adapter's dtype; dropout makes a new tensor, and keeps its mask when the input needs a
    gradient) and A's output for B."""
    saved, shared = 0, y_saved

    def share() -> int:
        nonlocal shared
        if shared:
            return 0
        shared = True
        return y * width

    for name in members:
        if trainable:
            saved += 2 * width if flow.autocast and y != 2 else share()
        if name in lora:
            new = y != flow.adapter or dropout
            saved += flow.dropout_mask * width if dropout and input_grad else 0
            if flow.autocast:
                saved += share() if (not new and y == 2) else 2 * width
            else:
                saved += flow.adapter * width if new else share()
            saved += rank * (2 if flow.autocast else flow.adapter)  # A's output, for B
    return saved


def _norm(flow: Flow, width: int, rows: int, trainable: bool, needs_input: bool, x: int) -> int:
    """RMSNorm as transformers writes it: an fp32 copy of the input (the input itself when it
    is fp32) and the inverse RMS, and the normalized tensor when the weight trains."""
    saved = (4 * width + 4 * rows) if needs_input else 0
    return saved + (x * width if trainable else 0)


def layer_saved_bytes(
    layer: _Layer,
    flow: Flow,
    full: bool,
    lora: set[str],
    rank: int,
    dropout: bool,
    input_grad: bool = True,
) -> int:
    """Bytes per token one decoder layer saves for backward (no checkpointing)."""
    h, s = layer.hidden, flow.stream
    saved = _norm(flow, h, 1, full, input_grad, s)
    y = max(flow.norm, s)
    args = (rank, dropout)
    qkv = ["q_proj", "k_proj", "v_proj"]
    saved += _group(flow, qkv, h, y, False, full, lora, *args, input_grad=input_grad)
    q = _out(flow, flow.linear, y)
    if layer.qk_norm:
        saved += _norm(flow, layer.q, layer.heads, full, True, q)
        saved += _norm(flow, layer.kv, layer.kv_heads, full, True, q)
        q = max(flow.norm, q)
    att = 2 if flow.autocast else max(q, s)  # rotary multiplies by cos/sin in the stream's dtype
    saved += att * (2 * layer.q + 2 * layer.kv) + 4 * layer.heads  # q, k, v, out, logsumexp
    saved += _group(flow, ["o_proj"], layer.q, att, True, full, lora, *args)
    saved += _norm(flow, h, 1, full, True, s)
    saved += _group(flow, ["gate_proj", "up_proj"], h, y, False, full, lora, *args)
    g = _out(flow, flow.linear, y)
    saved += 3 * layer.inter * g  # silu's input, its output and up's output (for the product)
    saved += _group(flow, ["down_proj"], layer.inter, g, False, full, lora, *args)
    return saved


def _layer_of(dims: ArchDims, inventory: Inventory) -> _Layer:
    qk_norm = any(m.name.endswith("self_attn.q_norm") for m in inventory.modules)
    return _Layer(
        hidden=dims.hidden,
        q=dims.heads * dims.head_dim,
        kv=dims.kv_heads * dims.head_dim,
        heads=dims.heads,
        kv_heads=dims.kv_heads,
        inter=dims.intermediate,
        qk_norm=qk_norm,
    )


@dataclass(frozen=True)
class Activations:
    """Bytes for one micro-batch: ``saved`` at the end of forward (the loss's log-probs
    included), the forward spike at the loss, the backward spike at the loss, and what one
    layer's backward holds on top (its recomputed activations with checkpointing)."""

    saved: int
    logits_spike: int
    loss_backward: int
    layer_backward: int
    weight_copies: int  # autocast's bf16 copies of fp32 Linear weights, saved for backward


def activation_bytes(
    dims: ArchDims,
    inventory: Inventory,
    plan: FinetuneSettings,
    flow: Flow,
    targets: list[ModuleInfo],
    micro_batch: int | None = None,
) -> Activations:
    layer = _layer_of(dims, inventory)
    tokens = (micro_batch or plan.micro_batch) * plan.seq_len
    full = plan.method == "full"
    lora = {m.name.rsplit(".", 1)[-1] for m in targets}
    rank, dropout = plan.lora.rank, plan.lora.dropout > 0
    per_layer = layer_saved_bytes(layer, flow, full, lora, rank, dropout)
    # LoRA without checkpointing: frozen embeddings give the first layer an input that needs
    # no gradient, so its input norm saves nothing (peft's enable_input_require_grads, which
    # checkpointing needs, changes that)
    first = layer_saved_bytes(layer, flow, full, lora, rank, dropout, input_grad=full)
    s, h, vocab = flow.stream, dims.hidden, dims.vocab
    if plan.checkpointing:
        layers = dims.layers * s * h  # each layer keeps its input
        recompute = per_layer
    else:
        layers = first + (dims.layers - 1) * per_layer
        recompute = 0
    y = max(flow.norm, s)
    head = _norm(flow, h, 1, full, True, s)
    head += _group(flow, ["lm_head"], h, y, False, full, set(), rank, False)
    logits = _out(flow, flow.head, y)
    ids = (8 if full else 0) + 8  # token ids (embedding grad) and labels
    saved = tokens * (layers + head + 4 * vocab + ids)
    if not plan.checkpointing:  # rotary's cos and sin, [1, seq, head_dim], shared by the layers
        saved += 2 * plan.seq_len * dims.head_dim * s
    spike = tokens * vocab * (logits + (4 if logits != 4 else 0))
    loss_backward = tokens * vocab * 8  # dense grad of the log-probs + log_softmax's grad
    g = _out(flow, flow.linear, y)
    work = (_BWD_MLP_WIDTHS * layer.inter + _BWD_HIDDEN_WIDTHS * h) * max(g, s)
    copies = 0
    if flow.autocast:
        fp32_linears = [
            m
            for m in inventory.linears()
            if m.role not in ("vision", "projector")
            and (flow.head if m.role == "lm_head" else flow.linear) == 4
        ]
        copies = 2 * sum(math.prod(m.weight_shape) for m in fp32_linears)
        if flow.adapter == 4:
            copies += 2 * sum(adapter_numels(targets, rank))
    return Activations(
        saved=saved + copies,
        logits_spike=spike,
        loss_backward=loss_backward,
        layer_backward=tokens * (recompute + work),
        weight_copies=copies,
    )


# ---------------------------------------------------------------- model states


def zero_model_states(
    params: int,
    trainable: int,
    cards: int,
    stage: int,
    offload_optimizer: bool,
    offload_params: bool,
    largest_layer: int,
    frozen_bytes: int = 0,
) -> tuple[int, int]:
    """(bytes per GPU, bytes of host memory for the node) of DeepSpeed ZeRO's model states in
    bf16 mixed precision, itemised as DeepSpeed's estimators count them: bf16 parameters (2),
    bf16 gradients (2), fp32 gradient partition (4), fp32 master weights (4), Adam's moments
    (8), the last four divided over the cards; ZeRO-3 gathers one layer at a time (4 bytes a
    parameter of the largest layer: bf16 weights and gradients). Offload moves the fp32 part
    (and with ZeRO-3 the parameters) to host memory, where each rank also loads the model in
    fp32 first (4 bytes × cards). ``frozen_bytes``: parameters that do not train (LoRA's base)
    as they sit on each card."""
    n = cards
    fp32_part = 16 * trainable  # fp32 grads + master + Adam, all ranks together
    if stage in (1, 2):
        grads16 = 2 * trainable if stage == 1 else 2 * trainable // n
        if offload_optimizer:
            return 2 * trainable + frozen_bytes, max(4 * n * params, fp32_part)
        return 2 * trainable + frozen_bytes + grads16 + fp32_part // n, 4 * n * params
    layer = 4 * largest_layer
    if offload_optimizer and offload_params:
        return layer, 18 * trainable
    if offload_optimizer:
        return layer + 2 * trainable // n + frozen_bytes, 16 * trainable
    return layer + 18 * trainable // n + frozen_bytes, 4 * n * largest_layer


def fsdp_model_states(
    trainable: int,
    cards: int,
    offload_optimizer: bool,
    offload_params: bool,
    largest_layer: int,
    frozen_bytes: int = 0,
) -> tuple[int, int]:
    """(bytes per GPU, host bytes of the node) of FSDP2 with bf16 compute over fp32 sharded
    parameters: parameters, gradients and Adam's moments (4 + 4 + 8 bytes) divided over the
    cards, and two layers' bf16 parameters gathered at a time (the one running and the one
    prefetched). ``CPUOffloadPolicy`` moves parameters, gradients and optimizer together."""
    gathered = 2 * 2 * largest_layer
    if offload_optimizer or offload_params:
        return gathered, 16 * trainable + frozen_bytes
    return gathered + (16 * trainable + frozen_bytes) // cards, 0


def largest_layer_params(inventory: Inventory) -> int:
    """The most parameters one module owns (DeepSpeed's ``model_to_params`` for ZeRO-3)."""
    return max((m.numel for m in inventory.modules), default=0)


# ---------------------------------------------------------------- the whole step


def price_training(
    inventory: Inventory,
    dims: ArchDims,
    plan: FinetuneSettings,
    base: BaseWeights,
    run_dtype_bytes: int,
    runtime_gb: float = 0.0,
    device: str = "cuda",
) -> TrainingEstimate:
    """Memory of one training step of ``plan`` per card, by phase, from step 2 on (the
    optimizer's states exist; gradients were set to None before forward), on ``device``
    (cuda, or cpu where the host runs the step)."""
    flow = flow_for(plan, run_dtype_bytes, device)
    targets = lora_targets(inventory, plan) if plan.trains_adapters else []
    numels = trainable_numels(inventory, plan)
    trainable = sum(numels)
    adapters = flow.adapter * trainable if plan.trains_adapters else 0
    weights = base.trained + base.buffers
    act = activation_bytes(dims, inventory, plan, flow, targets)
    n = plan.cards
    master = host = paged = 0
    if plan.sharding != "none":
        # DeepSpeed/FSDP hold parameters, gradients and optimizer states in their own layout
        frozen = base.trained if plan.trains_adapters else 0
        args = (trainable, n, plan.offload_optimizer, plan.offload_params)
        largest = largest_layer_params(inventory)
        if plan.sharding == "fsdp":
            gpu, host = fsdp_model_states(*args, largest, frozen)
        else:
            stage = int(plan.sharding[-1])
            gpu, host = zero_model_states(
                inventory.total_params, trainable, n, stage, *args[2:], largest, frozen
            )
        buckets = DS_BUCKETS * DS_REDUCE_BUCKET * 2 if plan.sharding in ("zero1", "zero2") else 0
        weights, grads, optimizer, adapters = gpu + base.buffers + buckets, 0, 0, 0
        model_states = gpu
    else:
        grad_bytes = flow.adapter if plan.trains_adapters else flow.linear or 4
        grads = grad_bytes * trainable
        optimizer = optimizer_state_bytes(numels, plan.optimizer, grad_bytes)
        if plan.optimizer == "paged_adamw_8bit":
            paged, optimizer = optimizer, 0
        model_states = weights + adapters + grads + optimizer + paged
    persistent = weights + adapters + optimizer + master
    forward = persistent + act.saved + act.logits_spike
    dequant = 2 * base.largest_4bit_weight  # bitsandbytes dequantizes a weight for grad_input
    backward = persistent + max(act.saved + act.loss_backward, grads + act.layer_backward + dequant)
    param_bytes = flow.adapter if plan.trains_adapters else flow.linear or 4
    step = (
        persistent + grads + optimizer_step_transient(numels, plan.optimizer, device, param_bytes)
    )
    phases = {"forward": forward / GB, "backward": backward / GB, "optimizer": step / GB}
    peak = max(forward, backward, step)
    return TrainingEstimate(
        method=plan.method,
        micro_batch=plan.micro_batch,
        seq_len=plan.seq_len,
        checkpointing=plan.checkpointing,
        weights_gb=weights / GB,
        loaded_weights_gb=(base.loaded + base.buffers) / GB,
        adapters_gb=adapters / GB,
        trainable_params=trainable,
        grads_gb=grads / GB,
        optimizer_gb=optimizer / GB,
        master_gb=master / GB,
        paged_gb=paged / GB,
        activations_gb=act.saved / GB,
        logits_gb=act.logits_spike / GB,
        loss_backward_gb=act.loss_backward / GB,
        runtime_gb=runtime_gb,
        host_gb=host / GB,
        model_states_gb=model_states / GB,
        phases_gb=phases,
        peak_gb=peak / GB,
        total_gb=(peak + paged) / GB + runtime_gb,
        details={
            "flow": asdict(flow),
            "lora_targets": len(targets),
            "autocast_weight_copies_gb": act.weight_copies / GB,
            "layer_backward_gb": act.layer_backward / GB,
        },
    )


# ---------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class PlanFit:
    method: str
    checkpointing: bool
    max_batch: int  # the largest of BATCHES that fits (0: not even batch 1)
    total_gb_at_1: float

    @property
    def fits(self) -> bool:
        return self.max_batch > 0

    def sentence(self) -> str:
        ckpt = "with" if self.checkpointing else "without"
        if not self.fits:
            return f"{self.method} does not fit {ckpt} checkpointing ({self.total_gb_at_1:.1f} GB at batch 1)"
        more = "+" if self.max_batch == BATCHES[-1] else ""
        return f"{self.method} fits at batch {self.max_batch}{more} {ckpt} checkpointing"


def plans_that_fit(
    inventory: Inventory,
    dims: ArchDims,
    plan: FinetuneSettings,
    bases: dict[str, BaseWeights],
    run_dtype_bytes: int,
    runtime_gb: float,
    usable_gb: float,
    device: str = "cuda",
) -> list[PlanFit]:
    """For each method ``bases`` prices (full, lora, qlora) with and without checkpointing:
    the largest micro-batch (of BATCHES, at the plan's sequence length) whose total fits
    ``usable_gb``. The other settings (optimizer, precision, sharding) are the plan's."""
    out = []
    for method, base in bases.items():
        for ckpt in (False, True):
            variant = replace(plan, method=method, checkpointing=ckpt)
            if method == "qlora" and plan.sharding in ("zero3", "fsdp"):
                continue
            best, first = 0, None
            for batch in BATCHES:
                est = price_training(
                    inventory,
                    dims,
                    replace(variant, micro_batch=batch),
                    base,
                    run_dtype_bytes,
                    runtime_gb,
                    device,
                )
                first = est.total_gb if first is None else first
                if est.total_gb > usable_gb:
                    break
                best = batch
            out.append(PlanFit(method, ckpt, best, first or 0.0))
    return out


def verdict_line(fits: list[PlanFit]) -> str:
    """One sentence over every plan: "full does not fit ...; lora fits at batch 2 with ..."."""
    return "; ".join(f.sentence() for f in fits)


# ---------------------------------------------------------------- the old rule, for reference


def sixteen_bytes_rule_gb(params: int) -> float:
    """The common rule of thumb: full fine-tuning with AdamW in fp32 takes 16 bytes a
    parameter (weights, gradients, two moments), activations left out."""
    return 16 * params / GB


def default_full_plan(micro_batch: int, seq_len: int) -> FinetuneSettings:
    """Full fine-tuning with AdamW, bf16 autocast over fp32 weights, no checkpointing, one
    card: what ``estimate()`` prices for ``workload.mode=finetune`` when no plan is given."""
    from qpipe.config.finetune import LoraSettings

    return FinetuneSettings(
        method="full",
        optimizer="adamw",
        precision="mixed",
        checkpointing=False,
        lora=LoraSettings(16, 32.0, (ALL_LINEAR,), 0.0),
        sharding="none",
        cards=1,
        offload_optimizer=False,
        offload_params=False,
        train_vision=False,
        steps=3,
        lr=1e-4,
        grad_accum=1,
        micro_batch=micro_batch,
        seq_len=seq_len,
    )


def full_finetune_extras(
    inventory: Inventory, dims: ArchDims, micro_batch: int, seq_len: int, weights_bytes: int
) -> tuple[int, int]:
    """(model states beyond ``weights_bytes``, activations at the forward peak) of
    ``default_full_plan``: fp32 weights, gradients and AdamW's moments replace the inference
    weights; the activations are what the step saves plus the loss's spike."""
    plan = default_full_plan(micro_batch, seq_len)
    est = price_training(
        inventory,
        dims,
        plan,
        BaseWeights(4 * inventory.total_params, 4 * inventory.total_params),
        4,
    )
    states = int((est.weights_gb + est.grads_gb + est.optimizer_gb) * GB) - weights_bytes
    return states, int((est.activations_gb + est.logits_gb) * GB)
