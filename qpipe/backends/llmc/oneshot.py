"""One ``oneshot`` call: load the source model, build the method's recipe, calibrate where the
method does, save the compressed checkpoint, and free what llm-compressor kept."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from qpipe.backends.align import plan_alignment
from qpipe.backends.base import QuantizeRequest, QuantizeResult
from qpipe.backends.llmc.calibration import PretokenizedOnly, calibration_kwargs, source_tokenizer
from qpipe.backends.llmc.checkpoint import save_checkpoint
from qpipe.backends.llmc.layers import linear_names
from qpipe.backends.llmc.method import llmc_method
from qpipe.backends.llmc.recipe import build_recipe, recipe_yaml
from qpipe.backends.llmc.validation import (
    CT_FORMAT,
    LEGAL_GROUP_SIZES,
    llmcompressor_missing,
    validate_quant,
)
from qpipe.config.safety import trust_remote_code
from qpipe.errors import BackendUnavailable, ConfigError


def _pad_plan(
    request: QuantizeRequest, model: torch.nn.Module, targets: list[str]
) -> dict[str, Any]:
    """The pad_align stage's plan; without one (the backend used on its own) the same plan
    ``pad_align.mode=auto`` would make, so a legal checkpoint comes out either way."""
    plan = dict(request.pad_plan or {})
    if plan.get("mode") == "pad":
        raise ConfigError(
            f"pad_align.mode=pad cannot be used with {CT_FORMAT} checkpoints "
            "(transformers and vLLM expect the model's shapes); use pad_align.mode=regroup"
        )
    if plan:
        return plan
    shapes = {n: list(model.get_submodule(n).weight.shape) for n in targets}
    return plan_alignment(
        shapes,
        targets,
        group_size=int(request.quant.get("group_size") or 0),
        legal=LEGAL_GROUP_SIZES,
        mode="auto",
        fmt=CT_FORMAT,
    )


def quantize_with_llmc(request: QuantizeRequest) -> QuantizeResult:
    """Run ``request.quant`` (gptq/awq/rtn, compressed-tensors format) through oneshot and
    save the compressed checkpoint, tokenizer and recipe into ``request.output_dir``."""
    validate_quant(request.quant)
    missing = llmcompressor_missing()
    if missing:
        raise BackendUnavailable(missing)
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    from qpipe.backends.llmc.patches import forget_fx_wraps
    from qpipe.backends.qlinear_loader import auto_class

    method = llmc_method(request.quant["method"])
    out = Path(request.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = request.model
    if model is None:
        model = auto_class(request.model_class).from_pretrained(
            request.source, dtype=request.dtype, trust_remote_code=trust_remote_code()
        )
    if not request.keep_in_host:
        # Otherwise oneshot's pipelines onload each module to the GPU only while it runs
        # (compressed_tensors' set_onload_device): a model larger than the GPU quantizes.
        model.to(request.device)
    linears = linear_names(model)
    targets = list(request.targets) or [n for n in linears if n not in set(request.skip_modules)]
    unknown = [t for t in targets if t not in set(linears)]
    if unknown:
        raise ConfigError(f"quantize: target {unknown[0]!r} is not a Linear module of the model")
    plan = _pad_plan(request, model, targets)
    recipe = build_recipe(
        request.quant,
        targets,
        [n for n in linears if n not in set(targets)],
        plan,
        bits=request.bits_by_module,
        model=model,
    )
    text = recipe_yaml(recipe)
    tokenizer = source_tokenizer(request.source)
    kwargs, details = (
        calibration_kwargs(request, model, tokenizer) if method.calibrates else ({}, {})
    )
    method.before_oneshot()
    start = time.perf_counter()
    with forget_fx_wraps():
        oneshot(
            model=model,
            recipe=text,
            processor=tokenizer if tokenizer is not None else PretokenizedOnly(),
            **kwargs,
        )
    details["quant.oneshot_s"] = round(time.perf_counter() - start, 2)
    recipe_path = save_checkpoint(model, tokenizer, text, recipe, out)
    # oneshot's session keeps the model alive after it returns: reset it, or the whole
    # calibrated model stays on the GPU through load and is counted as the loaded model's.
    reset_session()
    del model
    details.update(
        {
            "quant.format": CT_FORMAT,
            "quant.modules": len(targets),
            "quant.group_sizes": ",".join(sorted(plan["group_sizes"], key=int)),
            "align.summary": plan["summary"],
            "checkpoint.mb": round(
                sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20, 2
            ),
        }
    )
    return QuantizeResult(checkpoint=out, format=CT_FORMAT, recipe=recipe_path, details=details)
