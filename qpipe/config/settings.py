"""The run's settings: the composed config resolved once, before the run opens, into the typed
values the stages read (the device, dtype and kernel that ``auto`` becomes on this machine, the
model class, the task, the quant method's own options).

Stages read ``ctx.settings`` instead of re-deriving these from the raw config, so every stage
of a run sees the same device and kernel, and a bad value is refused before any stage runs.
What a quant *method* can do (calibrates, widths, kernels) is not here: it lives on its backend
(``qpipe.backends``), which sits above this layer.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qpipe.config.compose import resolve_device, resolve_dtype, resolve_kernel
from qpipe.config.finetune import FinetuneSettings, resolve_finetune
from qpipe.config.schema import check_schema
from qpipe.errors import ConfigError

TASKS = ("causal-lm", "image-text-to-text", "feature-extraction")


@dataclass(frozen=True)
class QuantSettings:
    """The ``quant`` group, typed, with the schema's defaults filled in.

    ``options`` is the group as composed (only the keys its YAML and the overrides set): that
    is what a backend validates, since each backend refuses the keys of other methods."""

    name: str
    method: str
    bits: int
    group_size: int
    symmetric: bool
    algorithm: str | None  # quant=auto: what rounds the plan's layers (gptq | rtn)
    options: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """A fresh copy of ``options`` (backends may change the dict they are given)."""
        return copy.deepcopy(dict(self.options))


@dataclass(frozen=True)
class Settings:
    """What a run is, resolved for this machine.

    device: where the model is quantized, loaded and measured (cpu, cuda, cuda:N).
    dtype: the dtype of the unquantized parts on ``device``.
    kernel: the matmul implementation of qpipe's quantized layers (triton, torch, hf).
    model_class / task: the transformers auto class and what the model does.
    budget_device / budget_dtype / budget_kernel: what the memory budget prices. A named GPU
      (``hardware=rtx4090``) is a plan for that GPU wherever qpipe runs now, so it is priced
      on CUDA in CUDA's dtype with CUDA's kernel; ``hardware=auto`` is this machine.
    """

    device: str
    dtype: torch.dtype
    kernel: str
    model_class: str
    task: str
    quant: QuantSettings
    budget_device: str
    budget_dtype: torch.dtype
    budget_kernel: str
    finetune: FinetuneSettings | None = None  # workload.mode=finetune or a train stage

    @property
    def dtype_name(self) -> str:
        """``bfloat16``, ``float32``...: the dtype as the config and MLflow spell it."""
        return str(self.dtype).removeprefix("torch.")


def resolve_settings(cfg: DictConfig, stage_keys: Collection[str] = frozenset()) -> Settings:
    """Check ``cfg`` against the typed schema and resolve it, once, into Settings; ConfigError
    (one line) for the first value that is wrong or cannot run on this machine.
    ``stage_keys``: top-level keys holding the pipeline's own stages' settings."""
    typed = check_schema(cfg, stage_keys)
    device = resolve_device(typed)
    kernel = resolve_kernel(typed, device)
    if kernel == "triton" and not device.startswith("cuda"):
        raise ConfigError("kernel=triton needs a CUDA device; use kernel=torch (or auto) on CPU")
    task = str(typed.model.task)
    if task not in TASKS:
        raise ConfigError(f"model.task={task!r} is not valid; use {_or(TASKS)}")
    budget_device = device if typed.hardware.name == "auto" else "cuda"
    quant = _quant_settings(typed.quant, cfg.quant)
    # A pipeline with a train stage fine-tunes whatever workload.mode says.
    finetune = None
    if typed.workload.mode == "finetune" or "train" in stage_keys:
        gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
        finetune = resolve_finetune(typed, budget_device, quant.method, quant.bits, gpus)
    return Settings(
        device=device,
        dtype=resolve_dtype(typed, device),
        kernel=kernel,
        model_class=str(typed.model.model_class),
        task=task,
        quant=quant,
        budget_device=budget_device,
        budget_dtype=resolve_dtype(typed, budget_device),
        budget_kernel=resolve_kernel(typed, budget_device),
        finetune=finetune,
    )


def _quant_settings(typed: DictConfig, composed: DictConfig) -> QuantSettings:
    options = OmegaConf.to_container(composed, resolve=True)
    return QuantSettings(
        name=str(typed.name),
        method=str(typed.method),
        bits=int(typed.bits),
        group_size=int(typed.group_size or 0),
        symmetric=bool(typed.symmetric),
        algorithm=typed.algorithm,
        options=MappingProxyType(options),
    )


def _or(words: Collection[str]) -> str:
    *first, last = words
    return f"{', '.join(first)} or {last}"
