"""The typed schema of qpipe's config: every key a stage reads, with its type.

The composed config is merged into this schema (OmegaConf structured configs) before the run
opens, so that a value of the wrong type (``quant.bits=abc``, even where ``quant=none`` never
reads it) or a key nothing reads (``+eval.max_token=100``, a typo of ``max_tokens``) is refused
with one line, instead of being ignored. A new config key is added here and in its YAML.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional, get_type_hints  # noqa: UP035 (OmegaConf reads these annotations at runtime)

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from qpipe.errors import ConfigError

# Optional[...] and List/Dict rather than ``X | None``: OmegaConf evaluates the annotations.
# ruff: noqa: UP006, UP045


@dataclass
class GgufSpec:
    package: str
    file: str


@dataclass
class PackageFolder:
    package: str
    subdir: str


@dataclass
class ModelSchema:
    name: str
    hub_id: Optional[str] = None
    path: Optional[str] = None
    weights: str = "real"  # real | hub | random
    seed: int = 0
    random_dtype: str = "bfloat16"
    tokenizer: Optional[str] = None
    model_class: str = "AutoModelForCausalLM"
    task: str = "causal-lm"
    config: Optional[dict[str, Any]] = None  # an inline transformers architecture config
    gguf: Optional[GgufSpec] = None
    package_folder: Optional[PackageFolder] = None
    trust_remote_code: bool = False  # run a checkpoint's own modelling code (auto_map)
    allow_pickle: bool = False  # load pickled weights (*.bin, *.pt)


@dataclass
class QuantSchema:
    """The keys every quant method has. A method's own options (bitsandbytes' quant_type,
    GPTQ's act_order, ...) are typed by its backend's ``Options`` dataclass
    (``qpipe/backends/<method>.py``), checked by ``check_options``."""

    name: str
    method: str
    bits: int
    group_size: int = 0  # 0: no groups (one scale per output channel, or none)
    # the backend class that runs ``method`` ("package.module:Class"): how a quant option
    # brings its backend, also from outside qpipe (see docs/extending.md)
    backend: Optional[str] = None


QUANT_COMMON = tuple(f.name for f in fields(QuantSchema))


@dataclass
class HardwareSchema:
    name: str
    memory_gb: Any = None  # GB per card: one number for every card, or a list
    runtime_overhead_gb: Optional[float] = None
    headroom_pct: float = 5.0
    count: Any = 1  # GPUs: auto | a number
    offload_gb: float = 0.0  # host memory that may hold what no GPU has room for
    l2_mb: Optional[float] = None  # the card's L2 (sizes the kernel tuner's cold copies)


@dataclass
class PlacementSchema:
    device_map: str = "auto"
    max_memory_gb: Any = None  # a number for every card, or a list
    gpus_per_job: int = 1


@dataclass
class EvalSchema:
    text: str
    max_tokens: int
    window: int
    baseline: bool
    prompt: str
    max_new_tokens: int
    prefill_tokens: int
    decode_batch_sizes: Any  # auto | a list of batch sizes (checked by decode_batch_sizes)
    repeats: int
    decode: str = "both"  # compiled | eager | both
    name: str = "eval"  # the first domain's name (quality.ppl.<name>)
    extra_texts: Optional[dict[str, str]] = None  # more domains: name -> text
    top_k: int = 32  # the baseline's cached log-probs per eval token (quality.kld)
    prompts: Optional[list[str]] = None  # greedy continuations scored by BLEU
    image: Optional[str] = None  # VLMs: a picture's path; None = the built-in one
    image_decode: str = "eager"  # decode with the image in context: compiled | eager | both
    quality_on_random: bool = False  # random weights: perplexity/agreement are noise, skipped


@dataclass
class CalibSchema:
    name: str
    dataset: Optional[str]
    dataset_config: Optional[str]
    split: str
    text_column: str
    text_file: str
    num_samples: int
    seq_len: int


@dataclass
class WorkloadSchema:
    mode: str
    batch_size: int
    context_len: int


@dataclass
class LoraSchema:
    rank: int = 16
    alpha: float = 32.0
    targets: Any = "all-linear"  # all-linear | a list of module names (checked by finetune.py)
    dropout: float = 0.0


@dataclass
class FinetuneSchema:
    """``finetune.*``: read with workload.mode=finetune or a pipeline with a train stage
    (values checked by qpipe/config/finetune.py)."""

    method: str = "lora"  # full | lora | qlora
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit | sgd
    precision: str = "auto"  # auto | mixed | bf16 | fp32
    gradient_checkpointing: bool = False
    lora: LoraSchema = field(default_factory=LoraSchema)
    sharding: str = "none"  # none | zero1 | zero2 | zero3 | fsdp
    cards: Any = "auto"  # auto (= hardware.count) | a number
    offload_optimizer: bool = False
    offload_params: bool = False
    train_vision: bool = False
    steps: int = 3
    train_seq_len: Any = "auto"  # auto | a number (the train stage's sequence; finetune.py)
    lr: float = 1e-4
    grad_accum: int = 1


@dataclass
class ExcludeSchema:
    lm_head: bool
    embeddings: bool
    vision_tower: bool
    projector: bool
    patterns: list[str] = field(default_factory=list)
    by: str = "rules"  # rules | sensitivity
    keep_top_k: int = 0
    keep_budget_gb: float = 0.0


@dataclass
class SensitivitySchema:
    samples: int = 2
    seq_len: int = 128


@dataclass
class PadAlignSchema:
    mode: str


@dataclass
class MlflowSchema:
    tracking_uri: Optional[str]
    experiment: str
    sweep_tag: Optional[str] = None
    fallback: Optional[str] = None  # null | local


@dataclass
class QpipeSchema:
    model: ModelSchema
    quant: QuantSchema
    hardware: HardwareSchema
    pipeline: str  # a pipeline name or a path to its YAML file
    workload: WorkloadSchema
    exclude: ExcludeSchema
    pad_align: PadAlignSchema
    mlflow: MlflowSchema
    placement: PlacementSchema = field(default_factory=PlacementSchema)
    sensitivity: SensitivitySchema = field(default_factory=SensitivitySchema)
    finetune: FinetuneSchema = field(default_factory=FinetuneSchema)
    eval: Optional[EvalSchema] = None
    calib: Optional[CalibSchema] = None
    device: str = "auto"
    dtype: str = "auto"
    kernel: str = "auto"
    fuse_projections: bool = True
    seed: int = 0


def _known_keys(schema: type, path: list[str]) -> list[str]:
    """The field names at ``path`` of the schema (for "did you mean")."""
    for part in path:
        hint = get_type_hints(schema).get(part)
        if hint is None:
            return []
        inner = [a for a in getattr(hint, "__args__", ()) if is_dataclass(a)]
        schema = inner[0] if inner else hint
        if not is_dataclass(schema):
            return []
    return [f.name for f in fields(schema)]


def schema_leaf(path: list[str]) -> bool:
    """Whether ``path`` (``["model", "path"]``) names a plain value of the schema."""
    *parents, leaf = path
    if leaf not in _known_keys(QpipeSchema, parents):
        return False
    return not _known_keys(QpipeSchema, path)


def check_schema(cfg: DictConfig, stage_keys: Collection[str] = frozenset()) -> DictConfig:
    """``cfg`` merged into the schema: every key typed, every default filled in. Raise
    ConfigError (one line) when ``cfg`` has a key the schema lacks or a value of the wrong type.
    ``stage_keys``: top-level keys that belong to the pipeline's own stages (their settings are
    theirs to check; they are left out of the result)."""
    known = {f.name for f in fields(QpipeSchema)}
    own = [k for k in cfg if k in stage_keys and k not in known]
    if own:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in own])
    if isinstance(cfg.get("quant"), DictConfig):
        # a method's own options are its backend's to type (check_options)
        cfg = OmegaConf.merge(cfg, {})
        with open_dict(cfg):
            cfg.quant = OmegaConf.masked_copy(
                cfg.quant, [k for k in cfg.quant if k in QUANT_COMMON]
            )
    try:
        return OmegaConf.merge(OmegaConf.structured(QpipeSchema), cfg)
    except OmegaConfBaseException as err:
        key = err.full_key or str(getattr(err, "key", "?"))
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, ConfigKeyError) or "not in" in first:
            path, _, leaf = key.rpartition(".")
            known = _known_keys(QpipeSchema, path.split(".") if path else [])
            close = difflib.get_close_matches(leaf, known, n=1)
            hint = f"; did you mean {path + '.' if path else ''}{close[0]}?" if close else ""
            where = f"{path}: " if path else ""
            raise ConfigError(
                f"{key} is not a qpipe setting, nothing would read it ({where}known keys: "
                f"{', '.join(known)}){hint}"
            ) from None
        value = OmegaConf.select(cfg, key, default="?") if key != "?" else "?"
        if "ListConfig" in first:
            first = "expected a list, e.g. [a, b]"
        elif "DictConfig" in first or "is not a subclass" in first:
            first = "expected a group of keys, not a single value"
        raise ConfigError(f"{key}={value!r} is not valid: {first}") from None


def check_options(quant: DictConfig, options: type, label: str) -> dict[str, Any]:
    """The method-specific keys of ``quant`` typed by its backend's ``options`` dataclass,
    every default filled in; ConfigError (one line) for a key the method does not have (with
    the closest one) or a value of the wrong type. ``label``: how the error names the option
    (``quant=gptq``)."""
    extra = OmegaConf.masked_copy(quant, [k for k in quant if k not in QUANT_COMMON])
    own = [f.name for f in fields(options)]
    unknown = [k for k in extra if k not in own]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), own, n=1)
        hint = f"; did you mean quant.{close[0]}?" if close else ""
        valid = ", ".join([*QUANT_COMMON, *own])
        raise ConfigError(
            f"quant.{unknown[0]} is not an option of {label} (its keys: {valid}){hint}"
        )
    try:
        typed = OmegaConf.merge(OmegaConf.structured(options), extra)
    except OmegaConfBaseException as err:
        key = str(getattr(err, "key", None) or err.full_key or "?")
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        value = OmegaConf.select(extra, key, default="?")
        raise ConfigError(f"quant.{key}={value!r} is not valid for {label}: {first}") from None
    return OmegaConf.to_container(typed, resolve=True)
