"""Spreading a model over several GPUs (and host memory): the device map, and what each device
holds at its peak.

The map is accelerate's own: transformers' ``_get_device_map`` (what ``from_pretrained(
device_map="balanced")`` runs) on the architecture instantiated on the meta device. Two things
differ from a plain ``device_map="auto"``, and both are why the map then fits:

- module sizes come from qpipe's estimator (a quantized Linear is priced in its real format,
  scales and zero points included), through the one hook transformers gives quantizers
  (``param_element_size``);
- ``max_memory`` of each GPU is what is left for weights once that GPU's CUDA context, KV
  cache and activations are set aside. accelerate counts weights only; a card capped at 12 GB
  should hold 12 GB in total, not 12 GB of weights and an OOM.

Then each device's peak is priced from the map as the allocator will see it:
- its resident weights and buffers;
- the KV cache of the decoder layers it executes. Layers offloaded to the CPU execute on the
  main GPU (accelerate's ``main_device``: the first GPU of the map), so their cache is there;
- the transient of a forward: the MLP's intermediates on each GPU that runs decoder layers,
  the last position's fp32 logits where lm_head runs;
- CPU offload: accelerate hooks every offloaded *leaf* module and copies its weights to the
  main GPU for its forward only, so the largest such copy rides on top of the phase it runs
  in (an offloaded lm_head next to the logits, an offloaded MLP projection next to the MLP's
  intermediates).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from qpipe.memory.estimator import (
    GB,
    ArchDims,
    Workload,
    activation_bytes,
    kv_cache_bytes,
)
from qpipe.memory.formats import WeightFormat
from qpipe.memory.inventory import Inventory, ModuleInfo

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from qpipe.memory.exclusion import PrecisionPlan

STRATEGIES = ("balanced", "balanced_low_0", "sequential")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class DeviceEstimate:
    """One device's share, in GB. GPUs: ``peak_gb`` is what the allocator should see at its
    peak, ``total_gb`` adds the CUDA context. The host (``cpu``) holds offloaded weights."""

    device: str  # cuda:0, cuda:1, ..., cpu
    capacity_gb: float
    usable_gb: float
    weights_gb: float
    kv_cache_gb: float = 0.0
    activations_gb: float = 0.0
    offload_transient_gb: float = 0.0
    runtime_gb: float = 0.0
    layers: list[int] = field(default_factory=list)
    peak_gb: float = 0.0
    total_gb: float = 0.0
    fits: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Placement:
    """A device map and what it costs each device."""

    strategy: str
    device_map: dict[str, int | str]
    devices: list[DeviceEstimate]
    main_device: str
    spilled_gb: float = 0.0  # what accelerate would have put on disk: no room anywhere

    @property
    def gpus(self) -> list[DeviceEstimate]:
        return [d for d in self.devices if d.device.startswith("cuda")]

    @property
    def offloaded_gb(self) -> float:
        return sum(d.weights_gb for d in self.devices if d.device == "cpu")

    @property
    def fits(self) -> bool:
        on_gpu = any(isinstance(d, int) for d in self.device_map.values())
        spilled = "disk" in self.device_map.values()
        return on_gpu and not spilled and all(d.fits for d in self.devices)

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "main_device": self.main_device,
            "device_map": {k: _device_name(v) for k, v in self.device_map.items()},
            "devices": [d.as_dict() for d in self.devices],
            "offloaded_gb": self.offloaded_gb,
            "spilled_gb": self.spilled_gb,
            "fits": self.fits,
        }


def _device_name(device: int | str) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


_META: dict[tuple[str, str], torch.nn.Module] = {}


def meta_model(config: PretrainedConfig, model_class_name: str) -> torch.nn.Module:
    """The architecture on the meta device (no memory), memoised per config."""
    import transformers

    key = (config.to_json_string(use_diff=False), model_class_name)
    if key not in _META:
        with torch.device("meta"):
            _META[key] = getattr(transformers, model_class_name).from_config(config)
    return _META[key]


class _EstimatedSizes:
    """What transformers asks of a quantizer while it builds a device map, answered from
    qpipe's estimator: the bytes each parameter will have once loaded."""

    def __init__(self, element_sizes: dict[str, float]) -> None:
        self.element_sizes = element_sizes

    def param_element_size(self, model: torch.nn.Module, name: str, param: torch.Tensor) -> float:
        return self.element_sizes.get(name, param.element_size())

    def adjust_max_memory(self, max_memory: dict) -> dict:
        return max_memory

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None


def module_bytes(
    module: ModuleInfo, fmt: WeightFormat | None, dtype_bytes: int
) -> tuple[int, float]:
    """(bytes of the module once loaded, bytes per element of its weight); ``fmt`` None: the
    module stays in the run's dtype."""
    if fmt is None or module.weight_shape is None:
        return module.numel * dtype_bytes, float(dtype_bytes)
    weight = math.prod(module.weight_shape)
    packed = fmt.linear_bytes(module.weight_shape, fmt.bits)
    return packed + (module.numel - weight) * dtype_bytes, packed / weight


def _element_sizes(
    model: torch.nn.Module,
    inventory: Inventory,
    targets: set[str],
    fmt: WeightFormat,
    dtype_bytes: int,
) -> dict[str, float]:
    by_module = {m.name: m for m in inventory.modules}
    sizes: dict[str, float] = {}
    for name, _ in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        info = by_module.get(owner)
        if info is None:
            continue
        quantized = owner in targets and leaf == "weight"
        sizes[name] = module_bytes(info, fmt if quantized else None, dtype_bytes)[1]
    return sizes


def device_of(name: str, device_map: dict[str, int | str]) -> int | str:
    """Where ``device_map`` puts module ``name`` (the longest matching prefix)."""
    probe = name
    while True:
        if probe in device_map:
            return device_map[probe]
        if not probe:
            raise KeyError(f"the device map does not place {name!r}")
        probe = probe.rpartition(".")[0]


def layer_index(module: ModuleInfo) -> int | None:
    if module.role not in ("block", "norm", "other"):
        return None
    match = _LAYER_INDEX.search(module.name)
    return int(match.group(1)) if match else None


def plan_placement(
    model: torch.nn.Module,
    inventory: Inventory,
    plan: PrecisionPlan,
    fmt: WeightFormat,
    dims: ArchDims,
    workload: Workload,
    dtype_bytes: int,
    usable_gb: list[float],
    capacity_gb: list[float],
    runtime_gb: float,
    offload_gb: float,
    strategy: str = "balanced",
) -> Placement:
    """Split the model over GPUs ``0..len(usable_gb)-1`` (then ``offload_gb`` of host memory)
    as accelerate would, and price each device's peak."""
    from transformers.integrations.accelerate import _get_device_map

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    targets = set(plan.targets)
    kv_total = kv_cache_bytes(dims, workload, dtype_bytes)
    logits = workload.batch_size * dims.vocab * 4 if dims.decoder else 0
    block_act = activation_bytes(dims, workload, dtype_bytes) - logits
    # Weights get what is left of each GPU after its context and the non-weight needs; the
    # KV cache is set aside whole on every GPU since the split is not known yet (safe: a GPU
    # never gets weights that would push its own cache out).
    reserve = runtime_gb * GB + kv_total + block_act + logits
    max_memory: dict[int | str, int] = {
        i: max(int(u * GB - reserve), 0) for i, u in enumerate(usable_gb)
    }
    if offload_gb > 0:
        max_memory["cpu"] = int(offload_gb * GB)
    sizes = _EstimatedSizes(_element_sizes(model, inventory, targets, fmt, dtype_bytes))
    # accelerate warns for every planned GPU this machine lacks: planning offline is the point.
    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        device_map = dict(_get_device_map(model, strategy, max_memory, sizes))
    finally:
        quiet.setLevel(level)

    gpus = sorted({d for d in device_map.values() if isinstance(d, int)})
    main = gpus[0] if gpus else "cpu"
    devices: dict[int | str, DeviceEstimate] = {
        i: DeviceEstimate(
            device=f"cuda:{i}",
            capacity_gb=capacity_gb[i],
            usable_gb=usable_gb[i],
            weights_gb=0.0,
            runtime_gb=runtime_gb,
        )
        for i in range(len(usable_gb))
    }
    if offload_gb > 0 or "cpu" in device_map.values():
        devices["cpu"] = DeviceEstimate("cpu", offload_gb, offload_gb, 0.0)
    weights: dict[int | str, int] = {}
    layers: dict[int | str, set[int]] = {}
    largest_offloaded = {"block": 0, "lm_head": 0, "embedding": 0}
    runs_blocks: set[int | str] = set()
    head_device: int | str = main
    for module in inventory.modules:
        where = device_of(module.name, device_map)
        size = module_bytes(module, fmt if module.name in targets else None, dtype_bytes)[0]
        weights[where] = weights.get(where, 0) + size
        execute = main if where in ("cpu", "disk") else where
        if where in ("cpu", "disk"):
            # Offloaded buffers stay on the main GPU (accelerate's offload_buffers=False).
            weights[main] = weights.get(main, 0) + module.buffer_numel * 4
            phase = module.role if module.role in largest_offloaded else "block"
            if module.role not in ("vision", "projector"):  # a text workload never runs them
                largest_offloaded[phase] = max(largest_offloaded[phase], size)
        else:
            weights[where] = weights.get(where, 0) + module.buffer_numel * 4
        index = layer_index(module)
        if index is not None:
            layers.setdefault(execute, set()).add(index)
            runs_blocks.add(execute)
        if module.role == "lm_head":
            head_device = execute

    per_layer_kv = kv_total / max(dims.layers, 1)
    for key, dev in devices.items():
        dev.weights_gb = weights.get(key, 0) / GB
        if key == "cpu":
            dev.peak_gb = dev.total_gb = dev.weights_gb
            dev.fits = dev.weights_gb <= offload_gb
            continue
        own_layers = sorted(layers.get(key, set()))
        dev.layers = own_layers
        dev.kv_cache_gb = per_layer_kv * min(len(own_layers), dims.layers) / GB
        on_main = key == main
        head_logits = logits if key == head_device else 0
        # The single-device estimate adds the last position's logits to the block transient
        # (within 2 % of the allocator on an H100); the same sum is kept here.
        act = (block_act if key in runs_blocks else 0) + head_logits
        phases = [act]
        if key in runs_blocks and on_main:
            phases.append(act + largest_offloaded["block"])
        if key == head_device and on_main:
            phases.append(head_logits + largest_offloaded["lm_head"])
        if on_main:
            phases.append(largest_offloaded["embedding"])
        transient = max(phases)
        dev.activations_gb = act / GB
        dev.offload_transient_gb = (transient - act) / GB
        dev.peak_gb = dev.weights_gb + dev.kv_cache_gb + transient / GB
        dev.total_gb = dev.peak_gb + runtime_gb
        dev.fits = dev.total_gb <= dev.usable_gb
    return Placement(
        strategy=strategy,
        device_map=device_map,
        devices=list(devices.values()),
        main_device=_device_name(main),
        spilled_gb=weights.get("disk", 0) / GB,
    )
