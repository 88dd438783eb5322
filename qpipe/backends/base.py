"""One interface for every quantization library.

A backend knows how to turn a local Hugging Face folder into a quantized checkpoint and how to
load that checkpoint back. It never knows about MLflow or Hydra: it gets plain values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


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
    them as arguments from the stage).

    bit_widths: the widths its layers may have (``quant.bits``; quant=auto: the plan's).
    kernels: the ``kernel`` values its checkpoints load with; the first one is what a run
      reports when the configured kernel is not among them (``dense``, ``bitsandbytes``: the
      library's own matmuls, which no kernel setting changes).
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
    bit_widths: tuple[int, ...]
    kernels: tuple[str, ...]
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

    def validate_kernel(self, quant: dict[str, Any], kernel: str) -> None:
        """Raise ConfigError when ``kernel`` cannot run the checkpoint ``quant`` will produce:
        found before quantizing, not after."""

    def validate(self, quant: dict[str, Any]) -> None:
        """Raise ConfigError naming a bad ``quant`` value and the valid ones. Cheap: it runs
        before anything heavy."""

    def unavailable_reason(self, quant: dict[str, Any], device: str) -> str | None:
        """Why this backend cannot run here (None when it can). Cheap: no weights touched."""

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        """Group sizes this format accepts (None: the method has no groups)."""

    def quantize(self, request: QuantizeRequest) -> QuantizeResult:
        """Quantize ``request.source`` into ``request.output_dir``."""

    def load(
        self,
        checkpoint: Path,
        model_class: str,
        device: str,
        dtype: torch.dtype,
        kernel: str,
        device_map: dict[str, Any] | None = None,
    ) -> torch.nn.Module:
        """Load a checkpoint made by ``quantize`` onto ``device``; ``kernel`` picks the
        matmul implementation where the backend has a choice ("torch", "triton").
        ``device_map`` (module name -> GPU index or "cpu", from the memory budget) spreads it
        over several devices instead; backends that cannot raise ConfigError."""
