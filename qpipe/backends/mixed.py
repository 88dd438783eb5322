"""``quant=auto``: carries out a mixed 16/8/4-bit plan through llm-compressor.

The plan (``QuantizeRequest.bits_by_module``) becomes one compressed-tensors config group per
bit width (and group size); 16-bit layers are in the recipe's ``ignore``. The layers are
rounded by GPTQ or RTN (``quant.algorithm``) in one ``oneshot`` call. ``load`` puts 4-bit
layers on qpipe's ``QuantLinear`` and 8-bit layers on ``Int8Linear`` (kernel torch/triton), or
hands the folder to transformers (kernel hf).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qpipe.backends.base import QuantizeRequest, QuantizeResult
from qpipe.backends.llmc import CT_FORMAT, LlmcBackend, quantize_with_llmc, validate_quant
from qpipe.errors import ConfigError
from qpipe.memory.bitplan import CHOICES, validate_auto

_AUTO_ONLY = {"choices", "algorithm", "weights_gb"}
_GPTQ_ONLY = {"act_order", "dampening", "block_size"}


def inner_quant(quant: dict[str, Any]) -> dict[str, Any]:
    """The gptq/rtn ``quant`` dict that rounds the plan's quantized layers."""
    algorithm = quant["algorithm"]
    inner = {k: v for k, v in quant.items() if k not in _AUTO_ONLY}
    if algorithm != "gptq":
        inner = {k: v for k, v in inner.items() if k not in _GPTQ_ONLY}
    inner.update(method=algorithm, name=f"auto-{algorithm}")
    return inner


class MixedBackend(LlmcBackend):
    name = "auto"
    bit_widths = CHOICES
    bits_in_run_name = False  # the widths are the plan's, one per layer
    plans_widths = True
    gpu_quantizing_priced = False  # not yet: the onload model prices one width per run

    def needs_calibration(self, quant: dict[str, Any]) -> bool:
        from qpipe.backends import get_backend

        return get_backend(quant["algorithm"]).needs_calibration(inner_quant(quant))

    def validate_kernel(self, quant: dict[str, Any], kernel: str) -> None:
        return None  # 4-bit layers on QuantLinear, 8-bit on Int8Linear: every kernel loads them

    def validate(self, quant: dict[str, Any]) -> None:
        if quant.get("method") != self.name:
            raise ConfigError(f"quant.method={quant.get('method')!r} given to the auto backend")
        validate_auto(quant)
        validate_quant(inner_quant(quant))

    def checkpoint_format(self, quant: dict[str, Any]) -> str:
        return CT_FORMAT

    def quantize(self, request: QuantizeRequest) -> QuantizeResult:
        self.validate(request.quant)
        if not request.targets:
            raise ConfigError(
                "quant=auto kept every layer at 16 bits (the model fits as it is): "
                "use quant=none, or a smaller hardware/quant.weights_gb"
            )
        inner = inner_quant(request.quant)
        result = quantize_with_llmc(replace(request, quant=inner))
        counts: dict[int, int] = {}
        for name in request.targets:
            b = int(request.bits_by_module.get(name, inner["bits"]))
            counts[b] = counts.get(b, 0) + 1
        result.details.update({f"quant.modules_{b}bit": n for b, n in sorted(counts.items())})
        return result
