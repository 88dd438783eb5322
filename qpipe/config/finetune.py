"""The fine-tuning plan (``finetune.*`` with ``workload.mode=finetune`` or a pipeline with a
``train`` stage), checked and resolved once into ``FinetuneSettings``.

What trains (full weights, LoRA adapters, LoRA over a 4-bit base), with which optimizer and
precision, with or without gradient checkpointing, and how the model states are spread over
cards (ZeRO 1/2/3, FSDP) or moved to host memory. The memory it takes is priced by
``qpipe.memory.training``; the train stage runs it."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from omegaconf import DictConfig, ListConfig

from qpipe.errors import ConfigError

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")
PRECISIONS = ("auto", "mixed", "bf16", "fp32")
SHARDINGS = ("none", "zero1", "zero2", "zero3", "fsdp")
ALL_LINEAR = "all-linear"  # peft's name for every Linear of the language model but lm_head
MIN_STEPS = 3  # step 1 allocates the optimizer's states: the peak is measured from step 2 on
# finetune.train_seq_len=auto on a CPU: at most this many tokens a sequence, so that the bare
# `pipeline=finetune` proves the estimate in a minute or two (2048 tokens take ten on 2 cores)
CPU_TRAIN_SEQ_LEN = 256


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # ("all-linear",) or module-name suffixes ("q_proj", "v_proj")
    dropout: float


@dataclass(frozen=True)
class FinetuneSettings:
    """method: full | lora | qlora. precision: mixed (bf16 autocast over fp32 master weights /
    adapters), bf16 (everything in bf16) or fp32 (no autocast: the CPU's). cards: the GPUs the
    plan runs over (data parallel, each with ``micro_batch`` sequences)."""

    method: str
    optimizer: str
    precision: str
    checkpointing: bool
    lora: LoraSettings
    sharding: str
    cards: int
    offload_optimizer: bool
    offload_params: bool
    train_vision: bool
    steps: int
    lr: float
    grad_accum: int
    micro_batch: int
    seq_len: int  # the workload's: what the verdict and the plan files are for
    train_seq_len: int | None = None  # what the train stage runs (None: seq_len)

    @property
    def trains_adapters(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def measured_seq_len(self) -> int:
        return self.train_seq_len or self.seq_len

    def as_measured(self) -> FinetuneSettings:
        """The plan at the sequence length the train stage runs (and measures)."""
        return replace(self, seq_len=self.measured_seq_len, train_seq_len=None)


def _or(words: Collection[str]) -> str:
    *first, last = words
    return f"{', '.join(first)} or {last}"


def _choice(key: str, value: object, valid: tuple[str, ...]) -> str:
    if str(value) not in valid:
        raise ConfigError(f"finetune.{key}={value!r} is not valid; use {_or(valid)}")
    return str(value)


def _cards(value: object, hardware: DictConfig, gpus_here: int) -> int:
    """``finetune.cards``: auto = ``hardware.count`` (every GPU here for hardware=auto); a
    number may not exceed the hardware's cards."""
    count = hardware.get("count", 1)
    have = gpus_here if count == "auto" else int(count)
    have = max(have, 1)  # a CPU (or a card env_check will find) plans one device
    if value == "auto":
        return have
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"finetune.cards={value!r} is not valid; use auto or a number ≥ 1")
    if value > have:
        raise ConfigError(
            f"finetune.cards={value} needs {value} cards but hardware={hardware.name} has {have} "
            f"(hardware.count={count}); set hardware.count={value} or finetune.cards≤{have}"
        )
    return value


def _targets(value: object) -> tuple[str, ...]:
    items = list(value) if isinstance(value, list | tuple | ListConfig) else [value]
    names = tuple(str(v).strip() for v in items)
    if not names or any(not n for n in names):
        raise ConfigError(
            f"finetune.lora.targets={value!r} is not valid; use {ALL_LINEAR} or a list of module "
            "names, e.g. [q_proj, v_proj]"
        )
    return names


def _train_seq_len(value: object, context_len: int, run_device: str) -> int:
    """``finetune.train_seq_len``: auto = the workload's sequence on a GPU, at most
    CPU_TRAIN_SEQ_LEN tokens on a CPU; or a number ≥ 1."""
    if value == "auto":
        on_gpu = run_device.startswith("cuda")
        return context_len if on_gpu else min(context_len, CPU_TRAIN_SEQ_LEN)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"finetune.train_seq_len={value!r} is not valid; use auto or a number of tokens ≥ 1"
        )
    return value


def resolve_finetune(
    typed: DictConfig, device: str, gpus_here: int, run_device: str | None = None
) -> FinetuneSettings:
    """The checked plan; ConfigError (one line) for the first value no run could use. Whether
    the quant option can be the base a method trains over is its backend's to say (preflight
    asks it: ``finetune_base``). ``device``: what the plan is priced for (the budget's);
    ``run_device``: where the train stage runs (default ``device``)."""
    ft = typed.finetune
    method = _choice("method", ft.method, METHODS)
    optimizer = _choice("optimizer", ft.optimizer, OPTIMIZERS)
    precision = _choice("precision", ft.precision, PRECISIONS)
    if precision == "auto":  # bf16 autocast where GPUs run it well; CPUs train in fp32
        precision = "mixed" if device.startswith("cuda") else "fp32"
    sharding = _choice("sharding", ft.sharding, SHARDINGS)
    if method == "qlora" and sharding in ("zero3", "fsdp"):
        raise ConfigError(
            f"finetune.sharding={sharding} with qlora is not priced (bitsandbytes' 4-bit weights "
            "shard only with a matching quant storage dtype); use sharding none, zero1 or zero2"
        )
    offload_optimizer, offload_params = bool(ft.offload_optimizer), bool(ft.offload_params)
    if offload_optimizer and sharding == "none":
        raise ConfigError(
            "finetune.offload_optimizer=true moves the optimizer to host memory through DeepSpeed "
            "or FSDP: set finetune.sharding to zero1, zero2, zero3 or fsdp"
        )
    if offload_params and sharding not in ("zero3", "fsdp"):
        raise ConfigError(
            f"finetune.offload_params=true needs sharded parameters: finetune.sharding=zero3 or "
            f"fsdp (not {sharding})"
        )
    steps = int(ft.steps)
    if steps < MIN_STEPS:
        raise ConfigError(
            f"finetune.steps={steps} is too few: use ≥ {MIN_STEPS} (the first step allocates "
            "the optimizer's states; the peak is measured from step 2 on)"
        )
    lr = float(ft.lr)
    if not lr > 0:
        raise ConfigError(f"finetune.lr={ft.lr!r} is not valid; use a learning rate > 0")
    if int(ft.grad_accum) < 1:
        raise ConfigError(f"finetune.grad_accum={ft.grad_accum} must be ≥ 1")
    lora = ft.lora
    if int(lora.rank) < 1:
        raise ConfigError(f"finetune.lora.rank={lora.rank} must be ≥ 1")
    if not float(lora.alpha) > 0:
        raise ConfigError(f"finetune.lora.alpha={lora.alpha} must be > 0")
    if not 0 <= float(lora.dropout) < 1:
        raise ConfigError(f"finetune.lora.dropout={lora.dropout} is not valid; use [0, 1)")
    batch, seq = int(typed.workload.batch_size), int(typed.workload.context_len)
    for key, value in (("batch_size", batch), ("context_len", seq)):
        if value < 1:
            raise ConfigError(f"workload.{key}={value} must be ≥ 1")
    return FinetuneSettings(
        method=method,
        optimizer=optimizer,
        precision=precision,
        checkpointing=bool(ft.gradient_checkpointing),
        lora=LoraSettings(
            rank=int(lora.rank),
            alpha=float(lora.alpha),
            targets=_targets(lora.targets),
            dropout=float(lora.dropout),
        ),
        sharding=sharding,
        cards=_cards(ft.cards, typed.hardware, gpus_here),
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        train_vision=bool(ft.train_vision),
        steps=steps,
        lr=lr,
        grad_accum=int(ft.grad_accum),
        micro_batch=batch,
        seq_len=seq,
        train_seq_len=_train_seq_len(ft.train_seq_len, seq, run_device or device),
    )
