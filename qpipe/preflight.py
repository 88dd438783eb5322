"""Check the composed config before anything heavy runs: one clear line per bad value."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from qpipe.backends import get_backend
from qpipe.backends.align import MODES as PAD_MODES
from qpipe.config.settings import Settings, resolve_settings
from qpipe.corpora.texts import read_text
from qpipe.dag import load_dag, pipeline_ref
from qpipe.devices.hardware import validate_placement
from qpipe.errors import ConfigError
from qpipe.evaluation.quality import validate_eval_texts
from qpipe.memory.exclusion import validate_exclude
from qpipe.models.source import model_class, source_kind


def validate_config(cfg: DictConfig) -> Settings:
    """The run's Settings, resolved once; ConfigError naming the first invalid value and what
    would be valid."""
    dag = load_dag(pipeline_ref(cfg))
    # Types and known keys first: the checks below trust them. A top-level key named after a
    # stage of this pipeline holds that stage's own settings (user stages: +savings.min_pct=50).
    settings = resolve_settings(cfg, get_backend, stage_keys=set(dag.stages))
    if source_kind(cfg.model) == "path":  # the user's folder: its config.json, before any run
        from qpipe.models.checkpoints import check_model_type, read_config
        from qpipe.models.source import checked_folder

        folder = checked_folder(cfg.model.path)
        check_model_type(folder, read_config(folder))
    model_class(cfg.model)
    quant = settings.quant.as_dict()
    backend = get_backend(settings.quant.method)
    backend.validate(quant)
    if settings.finetune is not None:
        _check_finetune_base(settings, backend.finetune_base(quant))
    validate_exclude(OmegaConf.to_container(cfg.exclude, resolve=True))
    wants_calib = backend.needs_calibration(quant) or backend.plans_widths
    if wants_calib or cfg.exclude.get("by") == "sensitivity":  # the sensitivity stage's texts
        from qpipe.corpora.calibration import validate_calib

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
    _check_ranges(cfg)
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
        from qpipe.config.compose import decode_batch_sizes
        from qpipe.evaluation import decode

        decode_batch_sizes(cfg, settings.device)
        decode.modes_for(str(cfg.eval.get("decode", "both")), settings.device)
        if str(cfg.eval.get("image_decode", "eager")) not in decode.DECODE_MODES:
            raise ConfigError(
                f"eval.image_decode={cfg.eval.image_decode!r} is not valid; use one of: "
                f"{', '.join(decode.DECODE_MODES)}"
            )
        if int(cfg.eval.max_new_tokens) < 2:
            raise ConfigError("eval.max_new_tokens must be ≥ 2 to time decoding")
    return settings


def _check_finetune_base(settings: Settings, base: str | None) -> None:
    """QLoRA trains adapters over a 4-bit base; full fine-tuning and LoRA over 16/32-bit
    weights: the quant option must be such a base (its backend says)."""
    from qpipe.backends import finetune_base_options

    method = settings.finetune.method
    kind = "qlora" if method == "qlora" else "dense"
    if base == kind:
        return
    what = "LoRA adapters over a 4-bit base" if kind == "qlora" else "over 16/32-bit weights"
    options = " or ".join(f"quant={o}" for o in finetune_base_options(kind))
    raise ConfigError(
        f"finetune.method={method} trains {what}, but quant={settings.quant.name}; "
        f"use {options or 'a quant option that is such a base'}"
    )


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _at_least(key: str, value: object, low: float, what: str = "a number") -> None:
    if not _number(value) or value < low:
        raise ConfigError(f"{key}={value!r} is not valid; use {what} ≥ {low:g}")


_RANDOM_DTYPES = ("float32", "float16", "bfloat16")


def _check_ranges(cfg: DictConfig) -> None:
    """The numbers and names the typed schema lets through but no stage could use (a
    negative overhead, a headroom of 100 % or more, a seed numpy refuses)."""
    hw = cfg.hardware
    if hw.get("runtime_overhead_gb") is not None:
        _at_least("hardware.runtime_overhead_gb", hw.runtime_overhead_gb, 0, "a number of GB")
    pct = hw.get("headroom_pct", 5.0)
    if not _number(pct) or not 0 <= pct < 100:
        raise ConfigError(
            f"hardware.headroom_pct={pct!r} is not valid; use a percentage in [0, 100)"
        )
    for key, value in (("seed", cfg.get("seed", 0)), ("model.seed", cfg.model.get("seed", 0))):
        if not _number(value) or not 0 <= value < 2**32:
            raise ConfigError(f"{key}={value!r} is not valid; use an integer in [0, 2**32)")
    model = cfg.model
    if source_kind(model) == "random":
        dtype = model.get("random_dtype", "bfloat16")
        if dtype not in _RANDOM_DTYPES:
            raise ConfigError(
                f"model.random_dtype={dtype!r} is not valid; use {', '.join(_RANDOM_DTYPES)}"
            )
        _check_borrowed_tokenizer(model.get("tokenizer"))
    if not str(cfg.mlflow.experiment).strip():
        raise ConfigError("mlflow.experiment='' is not valid; name the experiment")


def _check_borrowed_tokenizer(name: object) -> None:
    """``model.tokenizer`` of a random-weight model: qwen, a tokenizer folder, or a model."""
    if name in (None, "", "qwen"):
        return
    from pathlib import Path

    from qpipe.config.compose import CONF_DIR

    text = str(name)
    if Path(text).expanduser().is_dir() or (CONF_DIR / "model" / f"{text}.yaml").is_file():
        return
    models = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    raise ConfigError(
        f"model.tokenizer={text!r} is neither a tokenizer folder nor a model ({', '.join(models)}"
        ", qwen)"
    )
