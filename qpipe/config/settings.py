"""The run's settings: the composed config resolved once, before the run opens, into the typed
values the stages read (the device, dtype and kernel that ``auto`` becomes on this machine, the
model class, the task, the quant method's own options).

Stages read ``ctx.settings`` instead of re-deriving these from the raw config, so every stage
of a run sees the same device and kernel, and a bad value is refused before any stage runs.
What a quant *method* can do lives on its backend (``qpipe.backends``), a layer above this
one: the caller hands the backend in (``MethodFacts``: the typed options it takes and the
kernel it runs on a device), and the settings keep what it answered.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from qpipe.config.compose import resolve_device, resolve_dtype
from qpipe.config.finetune import FinetuneSettings, resolve_finetune
from qpipe.config.schema import check_options, check_schema
from qpipe.errors import ConfigError

TASKS = ("causal-lm", "image-text-to-text", "feature-extraction")


class MethodFacts(Protocol):
    """What resolving the settings asks of a quant method's backend."""

    Options: type  # a dataclass: the method's own ``quant`` keys, typed, with defaults

    def resolve_kernel(self, requested: str, quant: dict[str, Any], device: str) -> str:
        """The kernel its layers will run on ``device`` for ``kernel=requested`` (``auto``:
        its best there); ConfigError naming the valid kernels when it cannot run that one."""
        ...


@dataclass(frozen=True)
class QuantSettings:
    """The ``quant`` group, typed: the keys every method has and the method's own options
    (its backend's ``Options``), every default filled in."""

    name: str
    method: str
    bits: int
    group_size: int
    options: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """A fresh copy of every key (backends may change the dict they are given)."""
        return copy.deepcopy(dict(self.options))


@dataclass(frozen=True)
class Settings:
    """What a run is, resolved for this machine.

    device: where the model is quantized, loaded and measured (cpu, cuda, cuda:N).
    dtype: the dtype of the unquantized parts on ``device``.
    kernel: what the quant method's layers run on ``device`` (its backend resolved
      ``kernel: auto``): triton, torch, scaled_mm, hf, bitsandbytes, dense...
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


def resolve_settings(
    cfg: DictConfig,
    backend_of: Callable[[str], MethodFacts],
    stage_keys: Collection[str] = frozenset(),
) -> Settings:
    """Check ``cfg`` against the typed schema and resolve it, once, into Settings; ConfigError
    (one line) for the first value that is wrong or cannot run on this machine.
    ``backend_of``: the backend of a ``quant.method`` (``qpipe.backends.get_backend``).
    ``stage_keys``: top-level keys holding the pipeline's own stages' settings."""
    typed = check_schema(cfg, stage_keys)
    backend = backend_of(str(typed.quant.method))
    quant = _quant_settings(typed.quant, cfg.quant, backend)
    device = resolve_device(typed)
    requested = str(typed.kernel)
    task = str(typed.model.task)
    if task not in TASKS:
        raise ConfigError(f"model.task={task!r} is not valid; use {_or(TASKS)}")
    budget_device = device if typed.hardware.name == "auto" else "cuda"
    options = quant.as_dict()
    # A pipeline with a train stage fine-tunes whatever workload.mode says.
    finetune = None
    if typed.workload.mode == "finetune" or "train" in stage_keys:
        gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
        finetune = resolve_finetune(typed, budget_device, gpus, run_device=device)
    return Settings(
        device=device,
        dtype=resolve_dtype(typed, device),
        kernel=backend.resolve_kernel(requested, options, device),
        model_class=str(typed.model.model_class),
        task=task,
        quant=quant,
        budget_device=budget_device,
        budget_dtype=resolve_dtype(typed, budget_device),
        budget_kernel=backend.resolve_kernel(requested, options, budget_device),
        finetune=finetune,
    )


def _quant_settings(typed: DictConfig, composed: DictConfig, backend: MethodFacts) -> QuantSettings:
    common = {
        "name": str(typed.name),
        "method": str(typed.method),
        "bits": int(typed.bits),
        "group_size": int(typed.group_size or 0),
    }
    if typed.backend is not None:
        common["backend"] = str(typed.backend)
    own = check_options(composed, backend.Options, f"quant={typed.name}")
    return QuantSettings(
        name=common["name"],
        method=common["method"],
        bits=common["bits"],
        group_size=common["group_size"],
        options=MappingProxyType({**common, **own}),
    )


def _or(words: Collection[str]) -> str:
    *first, last = words
    return f"{', '.join(first)} or {last}"
