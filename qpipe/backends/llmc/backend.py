"""``LlmcBackend``: what GPTQ, AWQ and RTN share, and the facts each method states about
itself (its options, bit widths, whether it calibrates, its llm-compressor modifiers). The
defaults are plain round-to-nearest, llm-compressor's ``QuantizationModifier`` alone; GPTQ and
AWQ override them in ``gptq.py`` and ``awq.py``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qpipe.backends.base import QuantizeRequest, QuantizeResult
from qpipe.backends.llmc.oneshot import quantize_with_llmc
from qpipe.backends.llmc.validation import (
    CT_FORMAT,
    LEGAL_GROUP_SIZES,
    llmcompressor_missing,
    validate_kernel,
    validate_quant,
)
from qpipe.errors import ConfigError


class LlmcBackend:
    """Validation, group sizes, the compressed-tensors format, and loading (QuantLinear for
    kernel torch/triton, plain transformers for kernel hf)."""

    name = "llmc"
    # the ``quant`` keys of this method beyond name/method/bits/group_size/symmetric
    # (RTN's ``format``: compressed-tensors through llm-compressor, or qpipe's own qpipe-w4)
    options: frozenset[str] = frozenset({"format"})
    # widths llm-compressor's scheme and compressed-tensors' packing take (any of 1..8);
    # 4-bit runs on qpipe's Triton kernel, the others on the torch reference or transformers
    bit_widths: tuple[int, ...] = (2, 3, 4, 8)
    calibrates = False  # whether oneshot needs calibration data for this method
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

    def validate_kernel(self, quant: dict[str, Any], kernel: str) -> None:
        """One-line ConfigError when ``kernel`` cannot run the checkpoint ``quant`` makes."""
        validate_kernel(quant, kernel)

    def check_options(self, quant: Mapping[str, Any]) -> None:
        """ConfigError for a bad value of this method's own ``options``."""
        from qpipe.backends.qlinear_loader import QPIPE_W4

        fmt = quant.get("format", CT_FORMAT)
        if fmt not in (CT_FORMAT, QPIPE_W4):
            raise ConfigError(f"quant.format={fmt!r} is not valid; use {CT_FORMAT} or {QPIPE_W4}")
        if fmt == QPIPE_W4 and quant.get("bits") != 4:
            raise ConfigError(f"quant.format={QPIPE_W4} holds 4-bit weights; set quant.bits=4")

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
        validate_quant(quant)
        if quant.get("method") != self.name:
            raise ConfigError(
                f"quant.method={quant.get('method')!r} given to the {self.name} backend"
            )

    def unavailable_reason(self, quant: dict[str, Any], device: str) -> str | None:
        """Raises ConfigError for a bad value; returns why it cannot run here, or None."""
        self.validate(quant)
        if self.checkpoint_format(quant) == CT_FORMAT:
            return llmcompressor_missing()
        return None

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        return list(LEGAL_GROUP_SIZES)

    def checkpoint_format(self, quant: dict[str, Any]) -> str:
        """The layout of the checkpoint this backend writes (pad_align picks its mode by it)."""
        return CT_FORMAT

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
