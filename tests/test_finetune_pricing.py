"""Fine-tuning's pricing (qpipe/memory/training.py): the saved activations against what
autograd really saves, optimizer states against bitsandbytes' own, ZeRO's model states against
DeepSpeed's estimators, the plan files against DeepSpeed's and accelerate's parsers, and the
config's bad values refused in one line. Tiny models only: seconds in all."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from qpipe.config.finetune import FinetuneSettings, LoraSettings
from qpipe.errors import ConfigError
from qpipe.memory.dims import arch_dims
from qpipe.memory.inventory import inventory_of
from qpipe.memory.training import (
    BaseWeights,
    activation_bytes,
    flow_for,
    lora_targets,
    optimizer_state_bytes,
    optimizer_step_transient,
    plans_that_fit,
    price_training,
    zero_model_states,
)
from qpipe.training.launch import accelerate_config, deepspeed_config, write_plan
from tests.conftest import compose_config

LLAMA = LlamaConfig(
    hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, vocab_size=1024, tie_word_embeddings=True,
)  # fmt: skip
QWEN3 = Qwen3Config(
    hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, vocab_size=1024, tie_word_embeddings=False,
)  # fmt: skip


def plan(method="lora", precision="fp32", ckpt=False, dropout=0.0, **kw) -> FinetuneSettings:
    base = FinetuneSettings(
        method=method, optimizer="adamw", precision=precision, checkpointing=ckpt,
        lora=LoraSettings(8, 16.0, ("all-linear",), dropout), sharding="none", cards=1,
        offload_optimizer=False, offload_params=False, train_vision=False, steps=3, lr=1e-4,
        grad_accum=1, micro_batch=2, seq_len=32,
    )  # fmt: skip
    return replace(base, **kw)


def _saved_by_autograd(config, p: FinetuneSettings, dtype: torch.dtype) -> tuple[int, object]:
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    inventory = inventory_of(model)
    if p.trains_adapters:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=p.lora.rank, lora_alpha=16, target_modules="all-linear",
                          lora_dropout=p.lora.dropout)  # fmt: skip
        model = get_peft_model(model, lora, autocast_adapter_dtype=p.precision != "bf16")
    model.train()
    if p.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if p.trains_adapters:
            model.enable_input_require_grads()
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    ids = torch.randint(0, config.vocab_size, (p.micro_batch, p.seq_len))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.precision == "mixed"),
    ):
        model(input_ids=ids, labels=ids)
    return sum(seen.values()), inventory


@pytest.mark.parametrize(
    "config, p, dtype, run_bytes",
    [
        (LLAMA, plan("full", "fp32"), torch.float32, 4),
        (LLAMA, plan("full", "mixed"), torch.float32, 4),
        (LLAMA, plan("lora", "mixed"), torch.bfloat16, 2),
        (LLAMA, plan("lora", "fp32", dropout=0.1), torch.float32, 4),
        (LLAMA, plan("lora", "fp32", ckpt=True), torch.float32, 4),
        (QWEN3, plan("full", "bf16"), torch.bfloat16, 2),
        (QWEN3, plan("lora", "fp32"), torch.float32, 4),
        (QWEN3, plan("full", "fp32", ckpt=True), torch.float32, 4),
    ],
    ids=["llama-full-fp32", "llama-full-mixed", "llama-lora-mixed", "llama-lora-dropout",
         "llama-lora-ckpt", "qwen3-full-bf16", "qwen3-lora-fp32", "qwen3-full-ckpt"],
)  # fmt: skip
def test_saved_activations_match_autograd(config, p, dtype, run_bytes) -> None:
    measured, inventory = _saved_by_autograd(config, p, dtype)
    targets = lora_targets(inventory, p) if p.trains_adapters else []
    est = activation_bytes(arch_dims(config), inventory, p, flow_for(p, run_bytes, "cpu"), targets)
    assert est.saved == pytest.approx(measured, rel=0.01), (est.saved, measured)


def test_checkpointing_keeps_one_input_per_layer() -> None:
    model = AutoModelForCausalLM.from_config(LLAMA)
    inventory, dims = inventory_of(model), arch_dims(LLAMA)
    full, ckpt = plan("full"), plan("full", ckpt=True)
    flow = flow_for(full, 4, "cpu")
    a, b = (activation_bytes(dims, inventory, q, flow, []) for q in (full, ckpt))
    tokens = full.micro_batch * full.seq_len
    # everything a layer saved but its input is gone; one layer is recomputed in backward
    saved_layers = a.saved - b.saved + tokens * dims.layers * 4 * dims.hidden
    assert saved_layers > 0 and b.layer_backward > a.layer_backward
    assert b.saved < a.saved / 2


def test_optimizer_states_match_bitsandbytes() -> None:
    import bitsandbytes as bnb

    shapes = [(64, 128), (300,), (4096,)]  # 8-bit blocks, a small (32-bit) one, exactly 4096
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    opt.step()
    tensors = {id(t): t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
    measured = sum(t.numel() * t.element_size() for t in tensors.values() if t.numel() > 1)
    numels = [p.numel() for p in params]
    assert optimizer_state_bytes(numels, "adamw_8bit", 4) == measured
    assert optimizer_state_bytes(numels, "adamw", 4) == 8 * sum(numels)
    assert optimizer_state_bytes(numels, "adamw", 2) == 4 * sum(numels)
    assert optimizer_state_bytes(numels, "sgd", 4) == 0


def test_bnb_cpu_8bit_step_is_priced_with_its_float32_copies() -> None:
    """bitsandbytes' CPU 8-bit AdamW dequantizes both states of a tensor to float32 for its
    update: the step's measured host peak (over a baseline without states or gradient) is
    the states, the gradient and that transient."""
    import bitsandbytes as bnb

    from qpipe.devices.measure import PhaseMeter

    torch.manual_seed(0)
    n = 2_000_000
    param = torch.nn.Parameter(torch.randn(n // 1000, 1000))
    opt = bnb.optim.AdamW8bit([param], lr=1e-3)
    meter = PhaseMeter("cpu")
    for step in (1, 2):
        param.grad = torch.randn_like(param)
        with meter.phase("optimizer", step == 2):
            opt.step()
        param.grad = None
    transient = optimizer_step_transient([n], "adamw_8bit", "cpu", 4)
    priced = optimizer_state_bytes([n], "adamw_8bit", 4) + 4 * n + transient
    measured = meter.peaks["optimizer"] * 1e9
    assert transient == 20 * n
    assert abs(priced - measured) / measured < 0.06, (priced, measured)
    assert optimizer_step_transient([n], "adamw_8bit", "cuda", 4) == 0  # fused kernels
    assert optimizer_step_transient([n], "adamw", "cpu", 4) == 0


def test_train_seq_len_auto_is_short_on_cpu_only() -> None:
    from qpipe.config.finetune import CPU_TRAIN_SEQ_LEN, resolve_finetune
    from qpipe.config.schema import check_schema

    typed = check_schema(compose_config("workload.mode=finetune"), set())
    cpu = resolve_finetune(typed, "cpu", 0, run_device="cpu")
    gpu = resolve_finetune(typed, "cuda", 1, run_device="cuda:0")
    assert cpu.seq_len == gpu.seq_len == gpu.measured_seq_len == 2048
    assert cpu.measured_seq_len == CPU_TRAIN_SEQ_LEN
    assert cpu.as_measured().seq_len == CPU_TRAIN_SEQ_LEN
    typed = check_schema(compose_config("finetune.train_seq_len=64"), set())
    assert resolve_finetune(typed, "cuda", 1).measured_seq_len == 64


def _estimate(p: FinetuneSettings, params: int = 10**6) -> object:
    model = AutoModelForCausalLM.from_config(LLAMA)
    inventory = inventory_of(model)
    base = BaseWeights(4 * inventory.total_params, 4 * inventory.total_params)
    return price_training(inventory, arch_dims(LLAMA), p, base, 4)


def test_paged_states_leave_the_allocator_and_sharding_divides_states() -> None:
    adam, paged = _estimate(plan("full")), _estimate(plan("full", optimizer="paged_adamw_8bit"))
    assert paged.paged_gb > 0 and paged.optimizer_gb == 0
    assert paged.total_gb > paged.peak_gb  # NVML sees the managed memory
    assert adam.optimizer_gb > paged.paged_gb
    one, four = (_estimate(plan("full", sharding="zero2", cards=n, precision="mixed"))
                 for n in (1, 4))  # fmt: skip
    assert four.model_states_gb < one.model_states_gb
    off = _estimate(plan("full", sharding="zero2", precision="mixed", offload_optimizer=True))
    assert off.host_gb > 0 and off.model_states_gb < one.model_states_gb
    z3 = _estimate(plan("full", sharding="zero3", cards=8, precision="mixed"))
    assert z3.model_states_gb < four.model_states_gb


def test_model_states_agree_with_deepspeed(capsys) -> None:
    """DeepSpeed's estimators (model states only, every parameter trainable) against
    qpipe's ZeRO model states for the same live model: equal per GPU; on the host, with
    DeepSpeed's safety factor set to 1."""
    zero2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    zero3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    # large enough (67M parameters, left uninitialised) for DeepSpeed's 2-decimal GiB print
    layers = [torch.nn.utils.skip_init(torch.nn.Linear, 4096, 4096) for _ in range(4)]
    model = torch.nn.Sequential(*layers)
    inventory = inventory_of(model)
    total = inventory.total_params
    largest = max(m.numel for m in inventory.modules)
    for gpus in (1, 4):
        zero2.estimate_zero2_model_states_mem_needs_all_live(
            model, num_gpus_per_node=gpus, additional_buffer_factor=1.0
        )
        printed = capsys.readouterr().out
        rows = re.findall(r"([\d.]+)GB \|\s+([\d.]+)GB \| offload_optimizer=(\S+)", printed)
        for cpu_gib, gpu_gib, where in rows:
            offload = where.endswith("cpu")
            gpu, host = zero_model_states(total, total, gpus, 2, offload, False, largest)
            assert gpu / 2**30 == pytest.approx(float(gpu_gib), abs=0.006)
            assert host / 2**30 == pytest.approx(float(cpu_gib), abs=0.006)
            ds_cpu, ds_gpu = zero2.estimate_zero2_model_states_mem_needs(
                total, gpus, 1, cpu_offload=offload, additional_buffer_factor=1.0
            )
            assert (gpu, host) == (ds_gpu, ds_cpu)
        assert len(rows) == 2
        for offload, params in ((False, False), (True, False), (True, True)):
            ds_cpu, ds_gpu, _ = zero3.estimate_zero3_model_states_mem_needs(
                total, largest, gpus, 1, cpu_offload=offload, cpu_offload_params=params,
                zero_init=True, additional_buffer_factor=1.0,
            )  # fmt: skip
            gpu, host = zero_model_states(total, total, gpus, 3, offload, params, largest)
            assert gpu == ds_gpu
            assert host == ds_cpu
    zero3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=2)
    assert "offload_param=" in capsys.readouterr().out  # the live entry point runs too


def test_verdict_tries_methods_checkpointing_and_batches() -> None:
    model = AutoModelForCausalLM.from_config(LLAMA)
    inventory, dims = inventory_of(model), arch_dims(LLAMA)
    n = inventory.total_params
    bases = {"full": BaseWeights(4 * n, 4 * n), "lora": BaseWeights(4 * n, 4 * n)}
    p = plan("lora", seq_len=512)
    full = price_training(inventory, dims, replace(p, method="full", micro_batch=1),
                          bases["full"], 4)  # fmt: skip
    # a card between full at batch 1 and LoRA's: full does not fit, LoRA does
    usable = full.total_gb * 0.98
    fits = {
        (f.method, f.checkpointing): f
        for f in plans_that_fit(inventory, dims, p, bases, 4, 0.0, usable)
    }
    assert not fits[("full", False)].fits
    assert fits[("lora", True)].max_batch >= fits[("lora", False)].max_batch >= 1
    assert "does not fit" in fits[("full", False)].sentence()


def test_plan_files_parse_in_deepspeed_and_accelerate(tmp_path) -> None:
    p = plan("full", precision="mixed", sharding="zero3", cards=4, offload_optimizer=True,
             offload_params=True)  # fmt: skip
    ds, acc = write_plan(p, tmp_path, "LlamaDecoderLayer", "cuda")
    config = json.loads(ds.read_text())
    assert config["train_batch_size"] == 2 * 1 * 4
    zero_cfg = pytest.importorskip("deepspeed.runtime.zero.config")
    zero = zero_cfg.DeepSpeedZeroConfig(**config["zero_optimization"])
    assert int(zero.stage) == 3 and zero.offload_param is not None
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(acc))
    assert str(loaded.distributed_type).endswith("DEEPSPEED") and loaded.num_processes == 4
    fsdp = accelerate_config(replace(p, sharding="fsdp"), "Qwen3DecoderLayer", "x", "cuda")
    assert fsdp["fsdp_config"]["fsdp_version"] == 2
    assert deepspeed_config(replace(p, optimizer="adamw_8bit")).get("optimizer") is None


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["finetune.method=qlora"], "quant=bnb_nf4"),
        (["finetune.method=full", "quant=bnb_nf4"], "quant=none"),
        (["finetune.cards=4", "hardware=rtx4090_24gb"], "hardware.count=4"),
        (["finetune.steps=2"], "≥ 3"),
        (["finetune.optimizer=adam"], "adamw_8bit"),
        (["finetune.offload_optimizer=true"], "sharding"),
        (["workload.batch_size=0"], "workload.batch_size"),
        (["workload.context_len=-1"], "workload.context_len"),
        (["finetune.train_seq_len=0"], "finetune.train_seq_len"),
    ],
)
def test_bad_finetune_values_are_one_line(overrides, words) -> None:
    from qpipe.preflight import validate_config

    cfg = compose_config("workload.mode=finetune", *overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_lora_targets_that_match_nothing_name_the_closest() -> None:
    model = AutoModelForCausalLM.from_config(LLAMA)
    p = plan("lora", lora=LoraSettings(8, 16.0, ("q_prj",), 0.0))
    with pytest.raises(ConfigError, match="q_proj") as err:
        lora_targets(inventory_of(model), p)
    assert "\n" not in str(err.value)
