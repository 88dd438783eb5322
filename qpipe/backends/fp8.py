"""FP8 (e4m3) through llm-compressor's FP8_DYNAMIC scheme: weights rounded to e4m3 with one
scale per output channel, activations quantized per token at run time (W8A8, dynamic scales).
No calibration data; near-lossless at half the bytes of bf16. The checkpoint is
compressed-tensors ``float-quantized``, which vLLM and transformers load as it is.

Where it runs: FP8 tensor-core matmuls (``torch._scaled_mm``, kernel ``scaled_mm``) on GPUs of
compute capability 8.9 and later (L4, RTX 40xx, H100, H200); weight-only elsewhere (kernel
``torch``: each weight dequantized to the run's dtype for its matmul, on older GPUs and on
CPU). The run's ``kernel`` param says which ran.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qpipe.backends.base import named_kernel
from qpipe.backends.llmc import LlmcBackend
from qpipe.errors import ConfigError
from qpipe.kernels.fp8_linear import Fp8Linear, fp8_tensor_cores
from qpipe.memory.formats import WeightFormat

FORMAT = "float-quantized"  # compressed-tensors' name for this layout
_FP8 = {"num_bits": 8, "type": "float", "symmetric": True}


@dataclass(frozen=True)
class Fp8Format:
    """e4m3 weights (1 byte each) with a fp32 scale per output row. Over the prompt, the FP8
    matmul first quantizes the activations: x scaled in fp32 (one copy, scaled in place), then
    the e4m3 copy and a fp32 scale per token; weight-only, the dequantized weight lives while
    it runs."""

    dtype_bytes: int
    kernel: str
    bits: int = 8

    def linear_bytes(self, shape: tuple[int, int], bits: int) -> int:
        out_f, in_f = shape
        return out_f * in_f + out_f * 4

    def matmul_transient_bytes(self, shape: tuple[int, int], tokens: int) -> int:
        out_f, in_f = shape
        if self.kernel == "scaled_mm":
            return tokens * in_f * (4 + 1) + tokens * 4
        return out_f * in_f * self.dtype_bytes


class Fp8Backend(LlmcBackend):
    @dataclass
    class Options:
        """FP8_DYNAMIC has nothing to choose: e4m3, per-channel weights, per-token inputs."""

    name = "fp8"
    bit_widths = (8,)
    kernels = ("scaled_mm", "torch", "hf")
    bits_in_run_name = False  # one width
    runs_on_qpipe_kernel = False  # no 4-bit QuantLinear: neither fusion nor the W4 tuner apply

    def resolve_kernel(self, requested: str, quant: dict[str, Any], device: str) -> str:
        """``auto``: FP8 tensor cores where the GPU has them; weight-only elsewhere. Planning
        a named GPU from a machine without one, its FP8 matmul is assumed (what FP8 is for)."""
        cuda = device.startswith("cuda")
        here = cuda and torch.cuda.is_available()
        index = (torch.device(device).index or 0) if here else 0
        tensor_cores = cuda and (fp8_tensor_cores(index) if here else True)
        if requested == "auto":
            return "scaled_mm" if tensor_cores else "torch"
        named_kernel(self, requested, quant)
        if requested == "scaled_mm" and not tensor_cores:
            where = "this CPU" if not cuda else "this GPU"
            raise ConfigError(
                f"kernel=scaled_mm needs FP8 tensor cores (compute capability ≥ 8.9: L4, RTX 40xx, "
                f"H100, H200), which {where} lacks; use kernel=auto or torch (weight-only)"
            )
        return requested

    def weight_format(
        self, quant: dict[str, Any], dtype_bytes: int, device: str, kernel: str
    ) -> WeightFormat:
        return Fp8Format(dtype_bytes, kernel)

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        return None  # one scale per output channel

    def check_options(self, quant: Mapping[str, Any]) -> None:
        return None

    def config_groups(
        self,
        quant: Mapping[str, Any],
        targets: Sequence[str],
        pad_plan: Mapping[str, Any] | None,
        bits: Mapping[str, int] | None,
    ) -> dict[str, dict[str, Any]]:
        """FP8_DYNAMIC written out, so that the recipe says what ran."""
        return {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**_FP8, "strategy": "channel", "dynamic": False},
                "input_activations": {**_FP8, "strategy": "token", "dynamic": True},
            }
        }

    def load(
        self,
        checkpoint: Path,
        model_class: str,
        device: str,
        dtype: torch.dtype,
        kernel: str,
        device_map: dict[str, Any] | None = None,
    ) -> torch.nn.Module:
        if kernel == "hf":
            return super().load(checkpoint, model_class, device, dtype, kernel, device_map)
        if device_map:
            raise ConfigError(
                f"kernel={kernel} places a model on one device; use kernel=hf to spread it over "
                "several devices"
            )
        return load_fp8(Path(checkpoint), model_class, device, dtype, kernel)


def load_fp8(
    checkpoint: Path, model_class: str, device: str, dtype: torch.dtype, kernel: str
) -> torch.nn.Module:
    """A ``float-quantized`` compressed-tensors folder with its FP8 layers as ``Fp8Linear``."""
    from qpipe.backends.qlinear_loader import (
        assign_rest,
        empty_model,
        quantization_config,
        read_tensors,
        take_tensors,
    )

    fmt = quantization_config(checkpoint).get("format")
    if fmt != FORMAT:
        raise ConfigError(f"{checkpoint}: compressed-tensors format {fmt!r} is not {FORMAT} (FP8)")
    model = empty_model(checkpoint, model_class, dtype)
    tensors = read_tensors(checkpoint, model)
    names = [
        key.removesuffix(".weight_scale")
        for key in list(tensors)
        if key.endswith(".weight_scale")
        and tensors[key[: -len("_scale")]].dtype == torch.float8_e4m3fn
    ]
    if not names:
        raise ConfigError(f"{checkpoint}: no FP8 layers (no e4m3 '*.weight' with a weight_scale)")
    for name in names:
        own = take_tensors(tensors, name)
        module = Fp8Linear(own["weight"], own["weight_scale"], own.get("bias"), dtype, kernel)
        model.set_submodule(name, module)
    assign_rest(model, tensors, dtype, checkpoint)
    return model.to(device).eval()
