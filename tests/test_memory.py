"""The memory estimator: the seed's worked numbers, the InternVL inventory, and estimates
checked against real models loaded on this machine."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from qpipe.backends.bnb import BnbBackend
from qpipe.backends.none import load_hf
from qpipe.config import load_group
from qpipe.exclusion import plan_precision
from qpipe.measure import tensor_bytes
from qpipe.memory import (
    Workload,
    adamw_training_gb,
    arch_dims,
    build_inventory,
    estimate,
    weights_gb,
)
from qpipe.memory.estimator import kv_cache_bytes
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
    quant_none = {"method": "none", "bits": 16}
    bf16 = estimate(
        inv, plan_precision(inv, exclude, False), quant_none, arch_dims(config), work, 2
    )
    nf4_cfg = OmegaConf.to_container(load_group("quant", "bnb_nf4"))
    plan = plan_precision(inv, exclude, True)
    nf4 = estimate(inv, plan, nf4_cfg, arch_dims(config), work, 2)
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
    return plan, estimate(inv, plan, quant, arch_dims(config), Workload(), 4, 0.0, device)


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
