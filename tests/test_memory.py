"""The memory estimator: the seed's worked numbers, the InternVL inventory, and estimates
checked against real models loaded on this machine."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from qpipe.backends import weight_format_of
from qpipe.backends.bnb import BnbBackend
from qpipe.backends.none import load_hf
from qpipe.config.compose import load_group
from qpipe.devices.measure import tensor_bytes
from qpipe.memory import (
    DenseFormat,
    Workload,
    adamw_training_gb,
    arch_dims,
    build_inventory,
    estimate,
    weights_gb,
)
from qpipe.memory.estimator import kv_cache_bytes
from qpipe.memory.exclusion import plan_precision
from qpipe.models import load_config, materialize
from tests.conftest import compose_config


def test_seed_worked_numbers() -> None:
    assert weights_gb(8e9, 16) == pytest.approx(16.0)
    assert weights_gb(8e9, 8) == pytest.approx(8.0)
    assert weights_gb(8e9, 4) == pytest.approx(4.0)
    assert adamw_training_gb(8e9) == pytest.approx(128.0)


def test_internvl_inventory_matches_the_architecture() -> None:
    model_cfg = load_group("model", "internvl")
    inv = build_inventory(load_config(model_cfg), model_cfg.model_class)
    roles = {k: v / 1e9 for k, v in inv.by_role().items()}
    assert inv.total_params / 1e9 == pytest.approx(8.528, abs=0.002)
    assert roles["vision"] == pytest.approx(0.304, abs=0.001)
    assert roles["projector"] == pytest.approx(0.034, abs=0.001)
    assert roles["embedding"] == pytest.approx(0.622, abs=0.001)
    assert roles["lm_head"] == pytest.approx(0.622, abs=0.001)  # untied: counted twice
    assert roles["block"] == pytest.approx(6.946, abs=0.001)


def test_internvl_estimates_in_bf16_and_nf4() -> None:
    model_cfg = load_group("model", "internvl")
    config = load_config(model_cfg)
    inv = build_inventory(config, model_cfg.model_class)
    exclude = OmegaConf.to_container(compose_config().exclude)
    work = Workload(batch_size=1, context_len=2048)
    bf16 = estimate(
        inv, plan_precision(inv, exclude, False), DenseFormat(2), arch_dims(config), work, 2
    )
    nf4_cfg = OmegaConf.to_container(load_group("quant", "bnb_nf4"))
    plan = plan_precision(inv, exclude, True)
    nf4 = estimate(inv, plan, weight_format_of(nf4_cfg, 2, "cuda"), arch_dims(config), work, 2)
    assert bf16.weights_gb == pytest.approx(8.528 * 2, rel=0.001)
    # 36 layers × 7 linears quantized; the head, embeddings, vision tower, projector stay bf16.
    assert len(plan.targets) == 36 * 7
    assert nf4.params_quantized / 1e9 == pytest.approx(6.94, abs=0.01)
    assert nf4.weights_gb == pytest.approx(
        6.94 * 0.5 + (8.528 - 6.94) * 2 + nf4.quant_overhead_gb, rel=0.002
    )
    # KV: 2 × 36 layers × 8 heads × 128 × 2048 tokens × 2 bytes
    assert bf16.kv_cache_gb == pytest.approx(2 * 36 * 8 * 128 * 2048 * 2 / 1e9)


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = load_group("model", "tiny_llama")
    return cfg, materialize(cfg)


def _estimate_for(cfg, quant: dict, device: str = "cpu"):
    config = load_config(cfg)
    inv = build_inventory(config, cfg.model_class)
    plan = plan_precision(inv, {"lm_head": True, "embeddings": True}, quant["method"] != "none")
    fmt = weight_format_of(quant, 4, device)
    return plan, estimate(inv, plan, fmt, arch_dims(config), Workload(), 4, 0.0)


def test_fp32_weight_estimate_is_exact(tiny_llama) -> None:
    cfg, folder = tiny_llama
    model = load_hf(folder, cfg.model_class, "cpu", torch.float32)
    _, est = _estimate_for(cfg, {"method": "none", "bits": 32})
    assert (est.weights_gb + est.buffers_gb) * 1e9 == pytest.approx(tensor_bytes(model), rel=1e-9)


@pytest.mark.parametrize("option", ["bnb_nf4", "bnb_int8"])
def test_bnb_weight_estimate_matches_the_loaded_model(tiny_llama, option, tmp_path) -> None:
    """The estimate of packed weights + quant state against bitsandbytes' real tensors."""
    cfg, folder = tiny_llama
    quant = OmegaConf.to_container(load_group("quant", option))
    plan, est = _estimate_for(cfg, quant)
    from qpipe.backends import QuantizeRequest

    request = QuantizeRequest(
        source=folder,
        model_class=cfg.model_class,
        quant=quant,
        skip_modules=sorted(plan.skip),
        targets=plan.targets,
        output_dir=tmp_path,
        device="cpu",
        dtype=torch.float32,
    )
    checkpoint = BnbBackend().quantize(request).checkpoint
    model = BnbBackend().load(checkpoint, cfg.model_class, "cpu", torch.float32, "torch")
    measured = tensor_bytes(model)
    assert (est.weights_gb + est.buffers_gb) * 1e9 == pytest.approx(measured, rel=0.01)


def test_kv_cache_formula_matches_transformers_cache(tiny_llama) -> None:
    cfg, folder = tiny_llama
    model = load_hf(folder, cfg.model_class, "cpu", torch.float32)
    ids = torch.randint(0, 1000, (2, 100))
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    measured = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    dims = arch_dims(load_config(cfg))
    assert kv_cache_bytes(dims, Workload(batch_size=2, context_len=100), 4) == measured


def test_qpipe_kernels_runtime_costs_on_the_internvl_plan() -> None:
    """Measured on an H200 (bench/results/memory_smollm2_h200.md): fused gate/up hold one more
    [s, I] at the MLP; the first run of a 4-bit shape tunes it on cold copies of its weights
    (about three L2s, at most 31 copies); LLM.int8 holds int8 inputs and an int32 product."""
    from qpipe.kernels.tuning import cold_copy_count, tuning_transient_bytes
    from qpipe.memory import KernelFacts, quantized_matmuls

    model_cfg = load_group("model", "internvl")
    config = load_config(model_cfg)
    inv = build_inventory(config, model_cfg.model_class)
    exclude = OmegaConf.to_container(compose_config().exclude)
    plan = plan_precision(inv, exclude, True)
    rtn = weight_format_of(
        {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False}, 2, "cuda"
    )
    fused = dict(quantized_matmuls(inv, plan, rtn, fused=True))
    apart = dict(quantized_matmuls(inv, plan, rtn, fused=False))
    assert (24576, 4096) in fused and (24576, 4096) not in apart  # gate + up as one
    assert (6144, 4096) in fused and (4096, 4096) in apart  # q + k + v as one
    assert len(quantized_matmuls(inv, plan, rtn, fused=True)) == 36 * 4
    l2 = 60 * 2**20
    gate_up = fused[(24576, 4096)]
    assert cold_copy_count(gate_up, l2) == 4  # 3 extra copies of a 52.7 MB weight
    o_proj = fused[(4096, 4096)]  # 8.8 MB: 21 extra copies, the most held at once
    assert cold_copy_count(o_proj, l2) == 22
    assert tuning_transient_bytes(list(fused.values()), l2) == 21 * o_proj
    assert cold_copy_count(1000, l2) == 32 and tuning_transient_bytes([], l2) == 0

    dims, work = arch_dims(config), Workload(batch_size=1, context_len=2048)
    plain = estimate(inv, plan, rtn, dims, work, 2)
    tuned = estimate(inv, plan, rtn, dims, work, 2, kernels=KernelFacts(True, 21 * o_proj))
    extra_mlp = 2048 * config.text_config.intermediate_size * 2
    assert tuned.peak_gb - plain.peak_gb == pytest.approx((extra_mlp + 21 * o_proj) / 1e9)
    assert tuned.kernel_tuning_gb == pytest.approx(21 * o_proj / 1e9)

    int8 = estimate(
        inv, plan, weight_format_of({"method": "bnb", "bits": 8}, 2, "cuda"), dims, work, 2
    )
    nf4 = estimate(
        inv, plan, weight_format_of({"method": "bnb", "bits": 4}, 2, "cuda"), dims, work, 2
    )
    widest = 2048 * (4096 + 4 * 12288)  # gate/up: int8 [s, 4096] + int32 [s, 12288]
    assert int8.activations_gb - nf4.activations_gb == pytest.approx(widest / 1e9)
