"""The unquantized baseline: the source folder is the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from qpipe.backends import fixed_kernel
from qpipe.backends.base import QuantizeRequest, QuantizeResult
from qpipe.config.safety import trust_remote_code
from qpipe.memory.formats import DenseFormat, WeightFormat
from qpipe.memory.onload import CalibrationMemory


def load_hf(
    checkpoint: Path,
    model_class: str,
    device: str,
    dtype: torch.dtype | None,
    device_map: dict[str, Any] | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Plain transformers loading onto one device (or over the devices of ``device_map``:
    accelerate dispatches it, offloading the modules mapped to "cpu"), in eval mode."""
    cls = getattr(transformers, model_class)
    kwargs.setdefault("trust_remote_code", trust_remote_code())
    model = cls.from_pretrained(checkpoint, dtype=dtype, device_map=device_map or device, **kwargs)
    return model.eval()


class NoQuant:
    @dataclass
    class Options:
        """quant=none has no options of its own."""

    name = "none"
    bit_widths = (16,)
    kernels = ("dense",)
    calibration_memory = CalibrationMemory()
    runs_on_qpipe_kernel = False
    shardable = True
    bits_in_run_name = False
    plans_widths = False
    quantizes = False
    offload_note = None
    gpu_quantizing_priced = False

    def needs_calibration(self, quant: dict[str, Any]) -> bool:
        return False

    def resolve_kernel(self, requested: str, quant: dict[str, Any], device: str) -> str:
        return fixed_kernel(self, requested)

    def weight_format(
        self, quant: dict[str, Any], dtype_bytes: int, device: str, kernel: str
    ) -> WeightFormat:
        return DenseFormat(dtype_bytes)

    def validate(self, quant: dict[str, Any]) -> None:
        return None

    def unavailable_reason(self, quant: dict[str, Any], device: str) -> str | None:
        return None

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        return None

    def checkpoint_format(self, quant: dict[str, Any]) -> str | None:
        return None

    def finetune_base(self, quant: dict[str, Any]) -> str | None:
        return "dense"

    def quantize(self, request: QuantizeRequest) -> QuantizeResult:
        return QuantizeResult(checkpoint=request.source, format="hf")

    def load(
        self,
        checkpoint: Path,
        model_class: str,
        device: str,
        dtype: torch.dtype,
        kernel: str,
        device_map: dict[str, Any] | None = None,
    ) -> torch.nn.Module:
        return load_hf(checkpoint, model_class, device, dtype, device_map)
