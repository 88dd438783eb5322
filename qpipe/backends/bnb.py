"""bitsandbytes (nf4 / fp4 / LLM.int8) through transformers' BitsAndBytesConfig."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch

from qpipe.backends.base import QuantizeRequest, QuantizeResult
from qpipe.backends.none import load_hf
from qpipe.config.compose import dtype_from_name
from qpipe.errors import ConfigError

_QUANT_TYPES = ("nf4", "fp4")
BITS = (4, 8)


def _validate(quant: dict[str, Any]) -> None:
    bits = int(quant.get("bits", 0))
    if bits not in BITS:
        raise ConfigError(f"quant.bits={bits} is not valid for bitsandbytes; use 4 or 8")
    if bits == 4 and quant.get("quant_type") not in _QUANT_TYPES:
        raise ConfigError(
            f"quant.quant_type={quant.get('quant_type')!r} is not valid for 4-bit "
            f"bitsandbytes; use {' or '.join(_QUANT_TYPES)}"
        )


def bnb_config(quant: dict[str, Any], skip_modules: list[str], dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for a qpipe ``quant`` group."""
    from transformers import BitsAndBytesConfig

    _validate(quant)
    compute = dtype_from_name(quant.get("compute_dtype", "auto"), dtype)
    if int(quant["bits"]) == 8:
        return BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=float(quant.get("threshold", 6.0)),
            llm_int8_skip_modules=skip_modules,
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant["quant_type"],
        bnb_4bit_use_double_quant=bool(quant.get("double_quant", False)),
        bnb_4bit_compute_dtype=compute,
        # transformers names the skip list after int8, but it applies to 4-bit too.
        llm_int8_skip_modules=skip_modules,
    )


class BnbBackend:
    name = "bnb"
    bit_widths = BITS
    kernels = ("bitsandbytes",)
    runs_on_qpipe_kernel = False
    shardable = True
    bits_in_run_name = False  # the option says it: bnb_nf4, bnb_int8
    plans_widths = False
    quantizes = True
    offload_note = (
        "bitsandbytes keeps offloaded layers unquantized in fp32, which the budget does not price"
    )
    gpu_quantizing_priced = False  # it quantizes while loading: the load's peak is the price

    def needs_calibration(self, quant: dict[str, Any]) -> bool:
        return False

    def validate_kernel(self, quant: dict[str, Any], kernel: str) -> None:
        return None

    def validate(self, quant: dict[str, Any]) -> None:
        _validate(quant)

    def unavailable_reason(self, quant: dict[str, Any], device: str) -> str | None:
        _validate(quant)
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed (pip install bitsandbytes)"
        return None

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        return None  # blocks run over the flattened weight: any shape is legal

    def quantize(self, request: QuantizeRequest) -> QuantizeResult:
        config = bnb_config(request.quant, request.skip_modules, request.dtype)
        with warnings.catch_warnings():
            # bnb's int8 matmul warns on every call that it casts fp32 inputs to fp16.
            warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
            model = load_hf(
                request.source,
                request.model_class,
                request.device,
                request.dtype,
                quantization_config=config,
            )
        model.save_pretrained(request.output_dir)
        del model
        return QuantizeResult(
            checkpoint=request.output_dir,
            format=f"bitsandbytes-{request.quant.get('quant_type', 'int8')}",
            details={"skip_modules": len(request.skip_modules)},
        )

    def load(
        self,
        checkpoint: Path,
        model_class: str,
        device: str,
        dtype: torch.dtype,
        kernel: str,
        device_map: dict[str, Any] | None = None,
    ) -> torch.nn.Module:
        # The saved config.json carries the quantization config; transformers rebuilds the
        # bnb layers from it.
        model = load_hf(checkpoint, model_class, device, dtype, device_map)
        keep_cpu_repack_to_supported_widths(model)
        return model


# bitsandbytes 0.50's AVX512-BF16 CPU kernel repacks a 4-bit weight on its first forward in
# blocks of 32 output rows, and reshapes the scales as if the quantization blocks divided
# in_features.
_CPU_BLOCK_N = 32


def keep_cpu_repack_to_supported_widths(model: torch.nn.Module) -> int:
    """On CPUs with AVX512-BF16, bitsandbytes fails on 4-bit layers of other shapes (a 688-wide
    MLP: "N must be divisible by block_n", or a shape error on its scales); those layers take
    its generic CPU path instead, as they do on every other CPU. Returns how many switched."""
    switched = 0
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        block = int(getattr(state, "blocksize", 64) or 64)
        if module.out_features % _CPU_BLOCK_N or module.in_features % block:
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched
