"""What a model is made of, read from its config on the meta device (no weights, no memory).

The inventory is the input of both the memory estimator and the exclusion rules, so the two
always agree on module names and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from qpipe.config.safety import trust_remote_code

# Module-name prefixes that mark the vision tower and the multimodal projector across the VLMs
# transformers ships (InternVL, LLaVA, Qwen-VL, Gemma 3...).
VISION_PREFIXES = ("vision_tower", "vision_model", "visual", "vision_encoder")
PROJECTOR_PREFIXES = ("multi_modal_projector", "mm_projector", "visual.merger")


@dataclass(frozen=True)
class ModuleInfo:
    """One leaf module that owns tensors."""

    name: str
    kind: str  # linear | embedding | norm | conv | other
    role: str  # block | lm_head | embedding | norm | vision | projector | other
    numel: int  # parameters owned directly (weight + bias)
    buffer_numel: int
    weight_shape: tuple[int, ...] | None  # [out, in] for linears
    tied: bool = False  # its weight belongs to another module (tied embeddings)


@dataclass(frozen=True)
class Inventory:
    modules: tuple[ModuleInfo, ...]
    param_dtype_bytes: int  # bytes per element of the checkpoint's floating tensors

    @property
    def total_params(self) -> int:
        return sum(m.numel for m in self.modules)

    def by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules:
            out[m.role] = out.get(m.role, 0) + m.numel
        return out

    def linears(self) -> list[ModuleInfo]:
        return [m for m in self.modules if m.kind == "linear"]


def _segments(name: str) -> list[str]:
    return name.split(".")


def _role(name: str, kind: str, output_embedding_names: set[str]) -> str:
    parts = _segments(name)
    joined = "." + name + "."
    if any(f".{p}." in joined for p in PROJECTOR_PREFIXES):
        return "projector"
    if any(p in parts for p in VISION_PREFIXES):
        return "vision"
    if name in output_embedding_names:
        return "lm_head"
    if kind == "embedding":
        return "embedding"
    if kind == "norm":
        return "norm"
    if kind == "linear":
        return "block"
    return "other"


def _kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if "norm" in type(module).__name__.lower():
        return "norm"
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return "conv"
    return "other"


def inventory_of(model: torch.nn.Module) -> Inventory:
    """The inventory of an instantiated model (meta or real)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    output_names = {names[id(output)]} if output is not None and id(output) in names else set()
    seen: set[int] = set()  # tied weights are counted once, like the allocator does
    modules = []
    dtype_bytes = 4
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        params = [p for p in own if id(p) not in seen]
        buffers = list(module.buffers(recurse=False))
        if not own and not buffers:
            continue
        # A module whose weight is another's (a tied lm_head) still counts as a module, so the
        # exclusion rules see it, but its bytes were counted with the owner.
        tied = bool(own) and not params
        seen.update(id(p) for p in params)
        if params and params[0].is_floating_point():
            dtype_bytes = params[0].element_size()
        kind = _kind(module)
        shape = tuple(module.weight.shape) if kind == "linear" else None
        modules.append(
            ModuleInfo(
                name=name,
                kind=kind,
                role=_role(name, kind, output_names),
                numel=sum(p.numel() for p in params),
                buffer_numel=sum(b.numel() for b in buffers),
                weight_shape=shape,
                tied=tied,
            )
        )
    return Inventory(modules=tuple(modules), param_dtype_bytes=dtype_bytes)


_CACHE: dict[tuple[str, str], Inventory] = {}


def build_inventory(config: PretrainedConfig, model_class_name: str) -> Inventory:
    """Instantiate the architecture on the meta device and read its modules (memoised: the
    budget and the exclusion rules ask for the same architecture)."""
    import transformers

    key = (config.to_json_string(use_diff=False), model_class_name)
    if key not in _CACHE:
        cls = getattr(transformers, model_class_name)
        with torch.device("meta"):
            model = cls.from_config(config, trust_remote_code=trust_remote_code())
        _CACHE[key] = inventory_of(model)
    return _CACHE[key]
