"""Check the composed config before anything heavy runs: one clear line per bad value."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from qpipe.align import MODES as PAD_MODES
from qpipe.backends import get_backend
from qpipe.config import resolve_device, resolve_dtype, resolve_kernel
from qpipe.dag import load_dag, pipeline_ref
from qpipe.errors import ConfigError
from qpipe.exclusion import validate_exclude
from qpipe.hardware import validate_placement
from qpipe.models.source import model_class, source_kind
from qpipe.quality import validate_eval_texts
from qpipe.schema import check_schema
from qpipe.textdata import read_text


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first invalid value and what would be valid."""
    dag = load_dag(pipeline_ref(cfg))
    # Types and known keys first: the checks below trust them. A top-level key named after a
    # stage of this pipeline holds that stage's own settings (user stages: +savings.min_pct=50).
    check_schema(cfg, stage_keys=set(dag.stages))
    device = resolve_device(cfg)
    resolve_dtype(cfg, device)
    kernel = resolve_kernel(cfg, device)
    if kernel == "triton" and not device.startswith("cuda"):
        raise ConfigError("kernel=triton needs a CUDA device; use kernel=torch (or auto) on CPU")
    source_kind(cfg.model)
    model_class(cfg.model)
    task = cfg.model.get("task", "causal-lm")
    if task not in ("causal-lm", "image-text-to-text", "feature-extraction"):
        raise ConfigError(
            f"model.task={task!r} is not valid; use causal-lm, image-text-to-text or "
            "feature-extraction"
        )
    quant = OmegaConf.to_container(cfg.quant, resolve=True)
    backend = get_backend(quant.get("method"))
    backend.validate(quant)
    if quant["method"] in ("gptq", "awq", "rtn"):
        from qpipe.backends.llmc import validate_kernel

        validate_kernel(quant, kernel)
    validate_exclude(OmegaConf.to_container(cfg.exclude, resolve=True))
    calibrates = quant["method"] in ("gptq", "awq") or (
        quant["method"] == "auto" and quant.get("algorithm") == "gptq"
    )
    if calibrates or cfg.exclude.get("by") == "sensitivity" or quant["method"] == "auto":
        from qpipe.calib import validate_calib

        validate_calib(OmegaConf.to_container(cfg.calib, resolve=True))
    mode = cfg.get("pad_align", {}).get("mode", "auto")
    if mode not in PAD_MODES:
        raise ConfigError(
            f"pad_align.mode={mode!r} is not valid; use one of: {', '.join(PAD_MODES)}"
        )
    w = cfg.workload
    if w.mode not in ("inference", "finetune"):
        raise ConfigError(f"workload.mode={w.mode!r} is not valid; use inference or finetune")
    for key in ("batch_size", "context_len"):
        if int(w[key]) < 1:
            raise ConfigError(f"workload.{key}={w[key]} must be ≥ 1")
    validate_placement(cfg)
    if "sensitivity" in cfg:
        for key in ("samples", "seq_len"):
            if int(cfg.sensitivity[key]) < 1:
                raise ConfigError(f"sensitivity.{key}={cfg.sensitivity[key]} must be ≥ 1")
    if "eval" in cfg:
        read_text(cfg.eval.text)
        validate_eval_texts(cfg.eval)
        for key in ("max_tokens", "window", "max_new_tokens", "prefill_tokens", "repeats"):
            if int(cfg.eval[key]) < 1:
                raise ConfigError(f"eval.{key}={cfg.eval[key]} must be ≥ 1")
        from qpipe import decode
        from qpipe.config import decode_batch_sizes

        decode_batch_sizes(cfg, device)
        decode.modes_for(str(cfg.eval.get("decode", "both")), device)
        if str(cfg.eval.get("image_decode", "eager")) not in decode.DECODE_MODES:
            raise ConfigError(
                f"eval.image_decode={cfg.eval.image_decode!r} is not valid; use one of: "
                f"{', '.join(decode.DECODE_MODES)}"
            )
        if int(cfg.eval.max_new_tokens) < 2:
            raise ConfigError("eval.max_new_tokens must be ≥ 2 to time decoding")
