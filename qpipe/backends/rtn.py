"""Round-to-nearest: grouped min/max scales, no calibration. The baseline that shows what
GPTQ's and AWQ's calibration buys.

Two formats (``quant.format``):
- ``compressed-tensors`` (default): llm-compressor's QuantizationModifier, the same packing as
  GPTQ/AWQ, loadable by transformers and vLLM.
- ``qpipe-w4``: qpipe's own QuantLinear layout, which can hold zero-padded K, so it is the
  format where ``pad_align.mode=pad`` keeps the requested group size on any K.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpipe.backends.align import module_group_size, module_pad_to, plan_alignment
from qpipe.backends.base import QuantizeRequest, QuantizeResult
from qpipe.backends.llmc import (
    CT_FORMAT,
    LEGAL_GROUP_SIZES,
    LlmcBackend,
    quantize_with_llmc,
    source_tokenizer,
    validate_quant,
)
from qpipe.backends.qlinear_loader import QPIPE_W4, auto_class, save_qpipe_w4
from qpipe.config.safety import trust_remote_code
from qpipe.errors import ConfigError


class RtnBackend(LlmcBackend):
    @dataclass
    class Options(LlmcBackend.Options):
        # compressed-tensors (through llm-compressor) | qpipe-w4 (qpipe's QuantLinear layout,
        # which pad_align.mode=pad needs)
        format: str = CT_FORMAT

    name = "rtn"

    def checkpoint_format(self, quant: dict[str, Any]) -> str:
        return str(quant.get("format", CT_FORMAT))

    def check_options(self, quant: Mapping[str, Any]) -> None:
        fmt = quant.get("format", CT_FORMAT)
        if fmt not in (CT_FORMAT, QPIPE_W4):
            raise ConfigError(f"quant.format={fmt!r} is not valid; use {CT_FORMAT} or {QPIPE_W4}")
        if fmt == QPIPE_W4 and quant.get("bits") != 4:
            raise ConfigError(f"quant.format={QPIPE_W4} holds 4-bit weights; set quant.bits=4")

    def quantize(self, request: QuantizeRequest) -> QuantizeResult:
        validate_quant(request.quant)
        if self.checkpoint_format(request.quant) == CT_FORMAT:
            return quantize_with_llmc(request)
        return quantize_qpipe_w4(request)


def quantize_qpipe_w4(request: QuantizeRequest) -> QuantizeResult:
    """RTN into QuantLinear layers (padding K where the pad plan says), saved as qpipe-w4."""
    import torch

    from qpipe.kernels import QuantLinear

    quant = request.quant
    out = Path(request.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = request.model
    if model is None:
        model = auto_class(request.model_class).from_pretrained(
            request.source, dtype=request.dtype, trust_remote_code=trust_remote_code()
        )
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    skip = set(request.skip_modules)
    targets = list(request.targets) or [n for n in linears if n not in skip]
    default_gs = int(quant["group_size"])
    unknown = [t for t in targets if t not in linears]
    if unknown:
        raise ConfigError(f"quantize: target {unknown[0]!r} is not a Linear module of the model")
    # Without the pad_align stage's plan (the backend used on its own): what mode=auto does.
    plan = request.pad_plan or plan_alignment(
        {n: list(linears[n].weight.shape) for n in targets},
        targets,
        group_size=default_gs,
        legal=LEGAL_GROUP_SIZES,
        mode="auto",
        fmt=QPIPE_W4,
    )
    start = time.perf_counter()
    for name in targets:
        linear = linears[name]
        gs = module_group_size(plan, name, default_gs) or linear.in_features
        padded = module_pad_to(plan, name, linear.in_features) > linear.in_features
        q = QuantLinear.from_linear(
            linear,
            group_size=gs,
            symmetric=bool(quant.get("symmetric", True)),
            pad_to=gs if padded else None,
            dtype=request.dtype,
        )
        model.set_submodule(name, q)
    seconds = round(time.perf_counter() - start, 2)
    save_qpipe_w4(model, out, {"bits": 4, "group_size": default_gs, "method": "rtn"})
    tokenizer = source_tokenizer(request.source)
    if tokenizer is not None:  # folders without one (bare random weights) have none to copy
        tokenizer.save_pretrained(out)
    details = {
        "quant.modules": len(targets),
        "quant.format": QPIPE_W4,
        "quant.rtn_s": seconds,
        "align.summary": plan["summary"],
        "checkpoint.mb": round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20, 2),
    }
    return QuantizeResult(checkpoint=out, format=QPIPE_W4, recipe=None, details=details)
