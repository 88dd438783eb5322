"""AutoGPTQ and AutoAWQ checkpoints, loaded without those (archived/deprecated) packages.

A folder with config.json whose ``quantization_config`` says ``quant_method: gptq`` (AutoGPTQ /
GPTQModel: qweight, qzeros, scales, g_idx; sym or asym; desc_act) or ``quant_method: awq``
(AutoAWQ ``version: gemm``: qweight, qzeros, scales) loads into qpipe ``QuantLinear`` layers
through the exact converters of ``qpipe.kernels``. Use ``qpipe.backends.qlinear_loader
.load_checkpoint`` (any backend's ``load``): it dispatches here by ``quant_method``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qpipe.errors import ConfigError
from qpipe.kernels import IntWeights, from_autoawq, from_autogptq
from qpipe.kernels.formats import Extractor


def _bits(qcfg: Mapping[str, Any], method: str) -> int:
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    if bits != 4:
        raise ConfigError(
            f"this {method} checkpoint has bits={bits}: qpipe's QuantLinear holds 4-bit weights only"
        )
    return bits


def _group_size(qcfg: Mapping[str, Any], module: torch.nn.Module) -> int:
    gs = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    # -1 is both libraries' spelling of "one group spanning K" (per-channel scales).
    return gs if gs > 0 else module.in_features


def gptq_extractor(qcfg: Mapping[str, Any]) -> tuple[str, Extractor]:
    """AutoGPTQ v1 (``checkpoint_format: gptq``, the default) or GPTQModel v2 tensors."""
    bits = _bits(qcfg, "gptq")
    sym = bool(qcfg.get("sym", True))
    fmt = qcfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"gptq checkpoint_format={fmt!r} is not supported; known: gptq, gptq_v2")

    def extract(name: str, own: dict[str, torch.Tensor], module: torch.nn.Module) -> IntWeights:
        return from_autogptq(
            own["qweight"],
            own.get("qzeros"),
            own["scales"],
            own.get("g_idx"),
            bits=bits,
            sym=sym,
            zeros_minus_one=fmt == "gptq",  # AutoGPTQ's v1 stores each zero point minus one
            group_size=_group_size(qcfg, module),
        )

    return "qweight", extract


def awq_extractor(qcfg: Mapping[str, Any]) -> tuple[str, Extractor]:
    """AutoAWQ GEMM tensors (the layout every AutoAWQ model on the hub uses)."""
    _bits(qcfg, "awq")
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ConfigError(f"AutoAWQ version={version!r} is not supported; only gemm checkpoints")

    def extract(name: str, own: dict[str, torch.Tensor], module: torch.nn.Module) -> IntWeights:
        if "qzeros" not in own:
            raise ConfigError(f"AutoAWQ module {name} has no qzeros")
        return from_autoawq(
            own["qweight"], own["qzeros"], own["scales"], group_size=_group_size(qcfg, module)
        )

    return "qweight", extract


def legacy_extractor(qcfg: Mapping[str, Any]) -> tuple[str, Extractor]:
    method = qcfg.get("quant_method")
    if method == "gptq":
        return gptq_extractor(qcfg)
    if method == "awq":
        return awq_extractor(qcfg)
    raise ConfigError(f"quant_method={method!r} is not a legacy format; known: gptq, awq")
