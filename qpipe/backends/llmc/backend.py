"""``LlmcBackend``: what GPTQ, AWQ, RTN and FP8 share, and the facts each method states about
itself (its options, bit widths, whether it calibrates, its llm-compressor modifiers, its
weight format). The defaults are plain round-to-nearest of grouped integers, llm-compressor's
``QuantizationModifier`` alone; GPTQ, AWQ and FP8 override them in their own modules."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qpipe.backends.base import QuantizeRequest, QuantizeResult, named_kernel
from qpipe.backends.llmc.oneshot import quantize_with_llmc
from qpipe.backends.llmc.recipe import config_groups
from qpipe.backends.llmc.validation import (
    CT_FORMAT,
    LEGAL_GROUP_SIZES,
    llmcompressor_missing,
    validate_quant,
)
from qpipe.errors import ConfigError
from qpipe.memory.formats import WeightFormat
from qpipe.memory.onload import CalibrationMemory

# GPTQ checkpoints that keep a column permutation (g_idx) per layer
_ACT_ORDERS_WITH_G_IDX = (True, "group", "dynamic")
# widths qpipe's Triton kernels run (W4A16, W8A16); the others run on the torch reference
TRITON_BITS = (4, 8)


@dataclass(frozen=True)
class GroupedIntFormat:
    """Grouped integer weights as qpipe holds them once loaded (QuantLinear, Int8Linear,
    IntLinear): the payload at ``bits`` per weight, one scale per group in the run's dtype, one
    uint8 zero point per group (asymmetric), and a int32 column index where act-order saves
    one. Their matmuls read the packed weight directly (Triton), or dequantize it per call on
    the torch reference."""

    bits: int
    group_size: int
    symmetric: bool
    act_order: bool
    dtype_bytes: int

    def linear_bytes(self, shape: tuple[int, int], bits: int) -> int:
        out_f, in_f = shape
        group = self.group_size if self.group_size > 0 else in_f
        groups = math.ceil(in_f / group)
        payload = math.ceil(out_f * in_f * bits / 8)
        scales = out_f * groups * self.dtype_bytes
        zeros = 0 if self.symmetric else out_f * groups
        g_idx = in_f * 4 if self.act_order else 0
        return payload + scales + zeros + g_idx

    def matmul_transient_bytes(self, shape: tuple[int, int], tokens: int) -> int:
        return 0


class LlmcBackend:
    """Validation, group sizes, the compressed-tensors format, kernels, and loading
    (QuantLinear/Int8Linear for kernel torch/triton, plain transformers for kernel hf)."""

    @dataclass
    class Options:
        symmetric: bool = True  # False: a zero point per group

    name = "llmc"
    # widths llm-compressor's scheme and compressed-tensors' packing take (any of 1..8);
    # 4- and 8-bit run on qpipe's Triton kernels, the others on the torch reference or hf
    bit_widths: tuple[int, ...] = (2, 3, 4, 8)
    calibrates = False  # whether oneshot needs calibration data for this method
    calibration_memory = CalibrationMemory()
    # Checkpoints load on qpipe's own layers (QuantLinear, Int8Linear) or, with kernel=hf,
    # through transformers; qpipe's layers put a model on one device.
    kernels: tuple[str, ...] = ("triton", "torch", "hf")
    runs_on_qpipe_kernel = True
    shardable = False
    bits_in_run_name = True  # one option, several widths: smollm2-135m/gptq-w3
    plans_widths = False
    quantizes = True
    offload_note = None
    gpu_quantizing_priced = True  # llm-compressor's oneshot: whole, or onloaded layer by layer
    reads_model_in_memory = True  # QuantizeRequest.model (random weights never written)

    def needs_calibration(self, quant: dict[str, Any]) -> bool:
        return self.calibrates

    def resolve_kernel(self, requested: str, quant: dict[str, Any], device: str) -> str:
        """``auto``: qpipe's Triton kernels on a GPU for the widths they run (4, 8), else the
        torch reference; a kernel the checkpoint cannot run on is one line, before quantizing."""
        bits = int(quant["bits"])
        cuda = device.startswith("cuda")
        if requested == "auto":
            return "triton" if cuda and bits in TRITON_BITS else "torch"
        named_kernel(self, requested, quant)
        if requested == "triton" and not cuda:
            raise ConfigError(
                "kernel=triton needs a CUDA device; use kernel=torch (or auto) on CPU"
            )
        if requested == "triton" and bits not in TRITON_BITS:
            raise ConfigError(
                f"quant.bits={bits} with kernel=triton: qpipe's Triton kernels run 4- and 8-bit "
                "weights; use kernel=torch or auto (torch reference), kernel=hf, or quant.bits=4"
            )
        from qpipe.backends.qlinear_loader import QPIPE_W4

        if requested == "hf" and self.checkpoint_format(quant) == QPIPE_W4:
            raise ConfigError(
                f"kernel=hf cannot load quant.format={QPIPE_W4} (qpipe's own layout); "
                "use kernel=torch|triton or quant.format=compressed-tensors"
            )
        return requested

    def weight_format(
        self, quant: dict[str, Any], dtype_bytes: int, device: str, kernel: str
    ) -> WeightFormat:
        return GroupedIntFormat(
            bits=int(quant["bits"]),
            group_size=int(quant.get("group_size") or 0),
            symmetric=bool(quant.get("symmetric", True)),
            act_order=quant.get("act_order") in _ACT_ORDERS_WITH_G_IDX,
            dtype_bytes=dtype_bytes,
        )

    def check_options(self, quant: Mapping[str, Any]) -> None:
        """ConfigError for a bad value of this method's own ``Options`` (ranges and choices
        their types cannot say)."""

    def config_groups(
        self,
        quant: Mapping[str, Any],
        targets: Sequence[str],
        pad_plan: Mapping[str, Any] | None,
        bits: Mapping[str, int] | None,
    ) -> dict[str, dict[str, Any]]:
        """compressed-tensors config groups of grouped integer weights (see recipe.py)."""
        return config_groups(quant, targets, pad_plan, bits)

    def modifiers(
        self,
        quant: Mapping[str, Any],
        scheme: dict[str, Any],
        model: torch.nn.Module | None,
        targets: Sequence[str],
    ) -> dict[str, Any]:
        """The recipe's modifiers for ``scheme`` (the compressed-tensors ``ignore`` and
        ``config_groups``); ``model``, when given, is the one about to be quantized."""
        return {"QuantizationModifier": scheme}

    def before_oneshot(self) -> None:
        """What this method needs of the library before ``oneshot`` runs (see patches.py)."""

    def validate(self, quant: dict[str, Any]) -> None:
        """One-line ConfigError for a bad ``quant`` value (see ``validate_quant``)."""
        if quant.get("method") != self.name:
            raise ConfigError(
                f"quant.method={quant.get('method')!r} given to the {self.name} backend"
            )
        validate_quant(quant)

    def unavailable_reason(self, quant: dict[str, Any], device: str) -> str | None:
        """Raises ConfigError for a bad value; returns why it cannot run here, or None."""
        self.validate(quant)
        if self.checkpoint_format(quant) == CT_FORMAT:
            return llmcompressor_missing()
        return None

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        return list(LEGAL_GROUP_SIZES)

    def checkpoint_format(self, quant: dict[str, Any]) -> str | None:
        """The layout of the checkpoint this backend writes (pad_align picks its mode by it)."""
        return CT_FORMAT

    def finetune_base(self, quant: dict[str, Any]) -> str | None:
        return None  # qpipe trains over its own layers nowhere yet

    def quantize(self, request: QuantizeRequest) -> QuantizeResult:
        return quantize_with_llmc(request)

    def load(
        self,
        checkpoint: Path,
        model_class: str,
        device: str,
        dtype: torch.dtype,
        kernel: str,
        device_map: dict[str, Any] | None = None,
    ) -> torch.nn.Module:
        from qpipe.backends.qlinear_loader import load_checkpoint

        return load_checkpoint(checkpoint, model_class, device, dtype, kernel, device_map)
