"""``quant=auto``: carries out a mixed 16/8/4-bit plan through llm-compressor.

The plan (``QuantizeRequest.bits_by_module``) becomes one compressed-tensors config group per
bit width (and group size); 16-bit layers are in the recipe's ``ignore``. The layers are
rounded by GPTQ or RTN (``quant.algorithm``) in one ``oneshot`` call. ``load`` puts 4-bit
layers on qpipe's ``QuantLinear`` and 8-bit layers on ``Int8Linear`` (kernel torch/triton), or
hands the folder to transformers (kernel hf).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any  # noqa: UP035 (OmegaConf reads the Options annotations)

from qpipe.backends.base import QuantizeRequest, QuantizeResult
from qpipe.backends.gptq import GptqBackend
from qpipe.backends.llmc import CT_FORMAT, LlmcBackend, quantize_with_llmc, validate_quant
from qpipe.errors import ConfigError
from qpipe.memory.bitplan import CHOICES, validate_auto
from qpipe.memory.formats import WeightFormat

# What rounds the plan's 8- and 4-bit layers: methods whose recipes take one config group per
# width (AWQ's smoothing is searched for one width).
ALGORITHMS = ("gptq", "rtn")
_AUTO_ONLY = {"choices", "algorithm", "weights_gb", "backend"}


def inner_quant(quant: dict[str, Any]) -> dict[str, Any]:
    """The ``quant`` dict of the method (gptq | rtn) that rounds the plan's quantized layers:
    the keys it has, the plan's own left out."""
    from qpipe.backends import get_backend

    algorithm = quant["algorithm"]
    keys = {f.name for f in fields(get_backend(algorithm).Options)}
    inner = {
        k: v
        for k, v in quant.items()
        if k not in _AUTO_ONLY and (k in keys or k in ("name", "method", "bits", "group_size"))
    }
    inner.update(method=algorithm, name=f"auto-{algorithm}")
    return inner


class MixedBackend(LlmcBackend):
    @dataclass
    class Options(GptqBackend.Options):  # the rounding's options (GPTQ's, which RTN ignores)
        choices: list[int] | None = None  # the widths a layer may get: a subset of 16, 8, 4
        algorithm: str = "gptq"  # gptq | rtn: what rounds the 8- and 4-bit layers
        weights_gb: float | None = None  # a cap on the weights in GB (None: the card's room)

    name = "auto"
    bit_widths = CHOICES
    bits_in_run_name = False  # the widths are the plan's, one per layer
    plans_widths = True
    gpu_quantizing_priced = False  # not yet: the onload model prices one width per run

    def needs_calibration(self, quant: dict[str, Any]) -> bool:
        from qpipe.backends import get_backend

        return get_backend(quant["algorithm"]).needs_calibration(inner_quant(quant))

    def validate(self, quant: dict[str, Any]) -> None:
        if quant.get("method") != self.name:
            raise ConfigError(f"quant.method={quant.get('method')!r} given to the auto backend")
        if quant.get("algorithm") not in ALGORITHMS:
            raise ConfigError(
                f"quant.algorithm={quant.get('algorithm')!r} is not valid; use "
                f"{' or '.join(ALGORITHMS)}"
            )
        validate_auto(quant)
        validate_quant(inner_quant(quant))

    def weight_format(
        self, quant: dict[str, Any], dtype_bytes: int, device: str, kernel: str
    ) -> WeightFormat:
        """The rounding method's format, at the plan's lowest width (its layers' default)."""
        from qpipe.backends import get_backend

        inner = inner_quant(quant)
        return get_backend(inner["method"]).weight_format(inner, dtype_bytes, device, kernel)

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
