"""One interface for every quantization library.

A backend knows how to turn a local Hugging Face folder into a quantized checkpoint and how to
load that checkpoint back. It never knows about MLflow or Hydra: it gets plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from qpipe.errors import ConfigError
from qpipe.memory.formats import WeightFormat
from qpipe.memory.onload import CalibrationMemory


@dataclass
class QuantizeRequest:
    """Everything a backend needs to quantize one model.

    source: a local Hugging Face folder with the full-precision weights.
    model_class: the transformers auto class that loads it ("AutoModelForCausalLM", ...).
    quant: the ``quant`` config group as a plain dict (method, bits, group_size, ...).
    skip_modules: module names that stay in high precision (from exclude_layers).
    targets: module names of the Linear layers to quantize (from exclude_layers).
    pad_plan: the pad_align stage's outputs (schema in ``qpipe/backends/align.py``).
    calib_texts: calibration texts (GPTQ/AWQ); empty for methods that need none.
    calib_seq_len / calib_samples: calibration shape.
    keep_in_host: leave the model in host memory and let the library copy one layer at a time
      to ``device`` (a model larger than the GPU; llm-compressor's sequential onloading).
    bits_by_module: a mixed plan's width per target (quant=auto); targets absent use quant.bits.
    output_dir: where the checkpoint goes (created by the caller, empty).
    device: where quantization runs ("cpu", "cuda", "cuda:0").
    dtype: dtype of the unquantized parts.
    model: the source model already in memory (random weights, built rather than written to
      disk and read back), on ``device`` in ``dtype``; ``source`` then holds its config and
      tokenizer only. Backends that declare ``reads_model_in_memory`` use it; None: read
      ``source``.
    """

    source: Path
    model_class: str
    quant: dict[str, Any]
    skip_modules: list[str]
    targets: list[str]
    output_dir: Path
    device: str
    dtype: torch.dtype
    pad_plan: dict[str, Any] = field(default_factory=dict)
    calib_texts: list[str] = field(default_factory=list)
    calib_seq_len: int = 512
    calib_samples: int = 64
    keep_in_host: bool = False
    bits_by_module: dict[str, int] = field(default_factory=dict)
    model: Any = None


@dataclass
class QuantizeResult:
    """A finished checkpoint: a folder that ``Backend.load`` (and, for library formats,
    plain transformers) can load; ``format`` names its layout; ``recipe`` is the file that
    says how it was made (YAML), if any."""

    checkpoint: Path
    format: str
    recipe: Path | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """A quantization library behind qpipe's interface, with the facts about its method that
    the rest of qpipe asks (they live here and nowhere else; layers below the backends get
    them as arguments from the stage). A new method is one module with such a class and one
    ``conf/quant/<option>.yaml`` naming it (``backend: package.module:Class``).

    Options: a dataclass of the method's own ``quant`` keys (beyond name, method, bits,
      group_size and backend), with their types and defaults: the config is checked against
      it before the run opens (a misspelt key is named with the closest one).
    bit_widths: the widths its layers may have (``quant.bits``; quant=auto: the plan's).
    kernels: the kernels its layers may run (``kernel`` values besides ``auto``); the first
      is what it runs where nothing else can (``dense``, ``bitsandbytes``: the library's own
      matmuls, which no kernel setting changes).
    calibration_memory: what it keeps on the GPU while llm-compressor calibrates a layer.
    runs_on_qpipe_kernel: its 4-bit layers load as qpipe's QuantLinear (projection fusion, the
      Triton kernel and its autotuner apply).
    shardable: its checkpoints load spread over several devices (a device map) with any
      kernel; qpipe's own layers place a model on one device except through kernel=hf.
    bits_in_run_name: one option runs at several widths (``quant=gptq quant.bits=3``), so a
      run's name carries the width.
    plans_widths: each layer's width comes from a plan for the card (quant=auto), which wants
      a sensitivity measurement (calibration texts) and the memory budget's bit plan.
    quantizes: it changes the weights at all (quant=none does not).
    offload_note: why layers it offloads to host memory are not what the budget priced
      (None: they keep the checkpoint's format).
    gpu_quantizing_priced: the memory budget prices where it quantizes on a GPU (the whole
      model on the card, or layer by layer from host memory).
    """

    name: str
    Options: type
    bit_widths: tuple[int, ...]
    kernels: tuple[str, ...]
    calibration_memory: CalibrationMemory
    runs_on_qpipe_kernel: bool
    shardable: bool
    bits_in_run_name: bool
    plans_widths: bool
    quantizes: bool
    offload_note: str | None
    gpu_quantizing_priced: bool

    def needs_calibration(self, quant: dict[str, Any]) -> bool:
        """Whether quantizing needs calibration texts (GPTQ, AWQ; quant=auto when its
        ``algorithm`` does)."""
        ...

    def resolve_kernel(self, requested: str, quant: dict[str, Any], device: str) -> str:
        """The kernel its layers will run on ``device`` for ``kernel=requested`` (``auto``: the
        best it has there): what the run's ``kernel`` param reports. ConfigError naming the
        valid kernels when the checkpoint ``quant`` makes cannot run on that one: found
        before quantizing, not after."""
        ...

    def weight_format(
        self, quant: dict[str, Any], dtype_bytes: int, device: str, kernel: str
    ) -> WeightFormat:
        """How its quantized Linear layers sit in memory once loaded on ``device`` with
        ``kernel`` (bytes per layer and what its matmul holds): what the budget prices."""
        ...

    def validate(self, quant: dict[str, Any]) -> None:
        """Raise ConfigError naming a bad ``quant`` value and the valid ones (ranges the
        ``Options`` types cannot say). Cheap: it runs before anything heavy."""
        ...

    def unavailable_reason(self, quant: dict[str, Any], device: str) -> str | None:
        """Why this backend cannot run here (None when it can). Cheap: no weights touched."""
        ...

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        """Group sizes this format accepts (None: the method has no groups)."""
        ...

    def checkpoint_format(self, quant: dict[str, Any]) -> str | None:
        """The layout of the checkpoint it writes (pad_align picks its mode by it; None: the
        method has no layout of its own to align)."""
        ...

    def finetune_base(self, quant: dict[str, Any]) -> str | None:
        """What fine-tuning may train over this option's weights: ``dense`` (full fine-tuning
        and LoRA: weights in 16/32 bits), ``qlora`` (LoRA adapters over a frozen 4-bit base
        peft and bitsandbytes train through), or None."""
        ...

    def quantize(self, request: QuantizeRequest) -> QuantizeResult:
        """Quantize ``request.source`` into ``request.output_dir``."""
        ...

    def load(
        self,
        checkpoint: Path,
        model_class: str,
        device: str,
        dtype: torch.dtype,
        kernel: str,
        device_map: dict[str, Any] | None = None,
    ) -> torch.nn.Module:
        """Load a checkpoint made by ``quantize`` onto ``device``; ``kernel`` is what
        ``resolve_kernel`` chose. ``device_map`` (module name -> GPU index or "cpu", from the
        memory budget) spreads it over several devices instead; backends that cannot raise
        ConfigError."""
        ...


def named_kernel(backend: Backend, requested: str, quant: dict[str, Any]) -> str:
    """``requested`` when it is one of the backend's kernels; one line naming them otherwise."""
    if requested not in backend.kernels:
        raise ConfigError(
            f"kernel={requested!r} is not valid for quant={quant.get('name')}; use auto or "
            f"{', '.join(backend.kernels)}"
        )
    return requested


class BackendBase:
    """Defaults for a backend of one's own: a method that quantizes without calibration, whose
    checkpoints load on one device with its own kernel (``kernels[0]``). A subclass states
    ``name``, ``bit_widths``, ``kernels`` and ``weight_format``, implements ``quantize`` and
    ``load``, and overrides what else differs (docs/extending.md)."""

    @dataclass
    class Options:
        """No options of its own; a subclass declares its keys here, typed, with defaults."""

    name = "base"
    bit_widths: tuple[int, ...] = ()
    kernels: tuple[str, ...] = ("torch",)
    calibration_memory = CalibrationMemory()
    runs_on_qpipe_kernel = False
    shardable = False
    bits_in_run_name = False
    plans_widths = False
    quantizes = True
    offload_note: str | None = None
    gpu_quantizing_priced = False

    def needs_calibration(self, quant: dict[str, Any]) -> bool:
        return False

    def resolve_kernel(self, requested: str, quant: dict[str, Any], device: str) -> str:
        return self.kernels[0] if requested == "auto" else named_kernel(self, requested, quant)

    def validate(self, quant: dict[str, Any]) -> None:
        bits = quant.get("bits")
        if bits not in self.bit_widths:
            widths = ", ".join(str(b) for b in self.bit_widths)
            raise ConfigError(
                f"quant.bits={bits!r} is not valid for quant={quant.get('name')}; use {widths}"
            )

    def unavailable_reason(self, quant: dict[str, Any], device: str) -> str | None:
        self.validate(quant)
        return None

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        return None

    def checkpoint_format(self, quant: dict[str, Any]) -> str | None:
        return None

    def finetune_base(self, quant: dict[str, Any]) -> str | None:
        return None
