"""bitsandbytes (nf4 / fp4 / LLM.int8) through transformers' BitsAndBytesConfig."""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any  # noqa: UP035 (OmegaConf reads the Options annotations)

import torch

from qpipe.backends import fixed_kernel
from qpipe.backends.base import QuantizeRequest, QuantizeResult
from qpipe.backends.none import load_hf
from qpipe.config.compose import dtype_from_name
from qpipe.errors import ConfigError
from qpipe.memory.formats import WeightFormat
from qpipe.memory.onload import CalibrationMemory

_QUANT_TYPES = ("nf4", "fp4")
BITS = (4, 8)
BLOCK = 64  # bitsandbytes' 4-bit block size
NESTED_BLOCK = 256  # double quantization: absmax quantized to 8 bits in blocks of 256


def _validate(quant: dict[str, Any]) -> None:
    bits = int(quant.get("bits", 0))
    if bits not in BITS:
        raise ConfigError(f"quant.bits={bits} is not valid for bitsandbytes; use 4 or 8")
    if bits == 4 and quant.get("quant_type") not in _QUANT_TYPES:
        raise ConfigError(
            f"quant.quant_type={quant.get('quant_type')!r} is not valid for 4-bit "
            f"bitsandbytes; use {' or '.join(_QUANT_TYPES)}"
        )
    threshold = quant.get("threshold", 6.0)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold <= 0:
        raise ConfigError(f"quant.threshold={threshold!r} is not valid; use a number > 0")


@dataclass(frozen=True)
class BnbFormat:
    """bitsandbytes' layers as they sit on ``device``: 4-bit weights two to a byte with an
    absmax per block of 64 (fp32; 8-bit with a nested fp32 state under double quantization;
    bf16 once its CPU kernels repack them), or LLM.int8()'s int8 weights with a fp32 scale per
    output row, whose matmul quantizes the prompt's activations to int8 and holds the int32
    product before scaling it back."""

    bits: int
    double_quant: bool
    device: str

    def linear_bytes(self, shape: tuple[int, int], bits: int) -> int:
        out_f, in_f = shape
        numel = out_f * in_f
        if bits == 8:
            return numel + out_f * 4
        blocks = math.ceil(numel / BLOCK)
        if self.device == "cpu":
            state = blocks * 2
        elif self.double_quant:
            # 8-bit absmax per block + fp32 absmax per 256 blocks + the 256-entry fp32 code
            state = blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + 256 * 4 + 4
        else:
            state = blocks * 4
        return math.ceil(numel / 2) + state

    def matmul_transient_bytes(self, shape: tuple[int, int], tokens: int) -> int:
        out_f, in_f = shape
        return tokens * (in_f + 4 * out_f) if self.bits == 8 else 0


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
    @dataclass
    class Options:
        quant_type: str | None = None  # 4-bit: nf4 | fp4
        double_quant: bool = False  # quantize the per-block absmax too (4-bit)
        compute_dtype: str = "auto"  # auto = the run's dtype; float16 | bfloat16 | float32
        threshold: float = 6.0  # LLM.int8(): activation outliers above it run in 16-bit

    name = "bnb"
    bit_widths = BITS
    kernels = ("bitsandbytes",)
    calibration_memory = CalibrationMemory()
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

    def resolve_kernel(self, requested: str, quant: dict[str, Any], device: str) -> str:
        return fixed_kernel(self, requested)

    def weight_format(
        self, quant: dict[str, Any], dtype_bytes: int, device: str, kernel: str
    ) -> WeightFormat:
        return BnbFormat(int(quant["bits"]), bool(quant.get("double_quant", False)), device)

    def validate(self, quant: dict[str, Any]) -> None:
        _validate(quant)

    def unavailable_reason(self, quant: dict[str, Any], device: str) -> str | None:
        _validate(quant)
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed (pip install bitsandbytes)"
        return None

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        return None  # blocks run over the flattened weight: any shape is legal

    def checkpoint_format(self, quant: dict[str, Any]) -> str | None:
        return None

    def finetune_base(self, quant: dict[str, Any]) -> str | None:
        return "qlora" if int(quant.get("bits", 0)) == 4 else None  # QLoRA's base: 4-bit bnb

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
