"""Measured per-layer sensitivity and the 8-bit layer that carries mixed plans."""

from __future__ import annotations

import pytest
import torch

from qpipe.evaluation import layer_kl as sens
from qpipe.kernels import quantize_rtn
from qpipe.kernels.int8_linear import Int8Linear
from qpipe.memory.bitplan import predicted_loss
from tests.conftest import random_llama


def _tiny_llama() -> torch.nn.Module:
    return random_llama(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        initializer_range=0.2,  # large enough weights that one rounded layer shows in the KL
    )


def _layers(model) -> list[str]:
    return [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    ]


def test_replaying_earlier_blocks_gives_the_full_forward_result(monkeypatch) -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    layers = _layers(model)
    kwargs = {"bits": 4, "group_size": 32, "symmetric": False}
    fast = sens.measure_sensitivity(model, ids, layers, **kwargs)
    monkeypatch.setattr(sens, "_blocks", lambda _model: None)  # no replay: full forwards
    full = sens.measure_sensitivity(model, ids, layers, **kwargs)
    for name in layers:
        assert fast[name]["kl"] == pytest.approx(full[name]["kl"], rel=1e-4, abs=1e-9)
        assert fast[name]["kl"] > 0
    # Weights are restored: measuring again gives the same table.
    again = sens.measure_sensitivity(model, ids, layers[:3], **kwargs)
    assert again[layers[0]]["kl"] == pytest.approx(fast[layers[0]]["kl"], rel=1e-6)


def test_8_bit_loss_is_predicted_from_the_layers_own_rounding_error() -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    ratio = sens.noise_ratio(w, 64, symmetric=False)
    # Uniform rounding: error power ~ step^2, the 8-bit step is 15/255 of the 4-bit one.
    assert ratio == pytest.approx((15 / 255) ** 2, rel=0.3)
    entry = {"kl": 0.2, "noise_ratio_8": ratio}
    assert predicted_loss(entry, 4) == 0.2
    assert predicted_loss(entry, 8) == pytest.approx(0.2 * ratio)
    assert predicted_loss(entry, 16) == 0.0


def test_int8_linear_matches_its_dequantized_weight() -> None:
    lin = torch.nn.Linear(192, 40)
    iw = quantize_rtn(lin.weight.data, group_size=64, bits=8, symmetric=False)
    layer = Int8Linear(iw, lin.bias.data, torch.float32)
    x = torch.randn(3, 5, 192)
    ref = torch.nn.functional.linear(x, iw.dequantize(), lin.bias.data)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    # 8-bit rounding is close to the original layer, and it holds a byte per weight.
    assert torch.allclose(layer(x), lin(x), atol=2e-2)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (40, 192)
    with pytest.raises(ValueError, match="8-bit"):
        Int8Linear(quantize_rtn(lin.weight.data, group_size=64, bits=4), None, torch.float32)


def test_the_stage_measures_only_when_asked_and_weights_are_real() -> None:
    from qpipe.stages.sensitivity import skip_reason
    from tests.conftest import compose_config

    assert "exclude.by=rules" in skip_reason(compose_config("quant=rtn"))
    assert "quant=none" in skip_reason(compose_config("exclude.by=sensitivity"))
    assert "random weights" in skip_reason(compose_config("quant=auto", "model=tiny_llama"))
    assert skip_reason(compose_config("quant=auto")) is None
    assert skip_reason(compose_config("quant=gptq", "exclude.by=sensitivity")) is None


@pytest.mark.slow
def test_keep_top_k_runs_through_the_pipeline_on_smollm2(tmp_path, outputs_dir) -> None:
    """exclude.by=sensitivity from the CLI's config to exclude_layers' skip list, through
    memory_budget (which prices every option with the same measured ranking)."""
    from hydra import compose, initialize_config_dir

    from qpipe.app import run_pipeline
    from qpipe.config.compose import CONF_DIR

    dag = tmp_path / "rank.yaml"
    dag.write_text(
        "name: rank\nstages:\n  env_check: {}\n  sensitivity: {needs: [env_check]}\n"
        "  memory_budget: {needs: [env_check, sensitivity]}\n"
        "  exclude_layers: {needs: [memory_budget]}\n"
    )
    overrides = [
        "quant=rtn",
        "exclude.by=sensitivity",
        "exclude.keep_top_k=3",
        "sensitivity.samples=1",
        "sensitivity.seq_len=16",
        f"pipeline={dag}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    report = run_pipeline(cfg, tmp_path / "run")
    assert report.status == "FINISHED", report.error
    skip = report.results["exclude_layers"].outputs["skip"]
    ranked = [n for n, why in skip.items() if why.startswith("exclude.by=sensitivity")]
    assert len(ranked) == 3
    kl = report.results["sensitivity"].outputs["layers"]
    top3 = sorted(kl, key=lambda n: -float(kl[n]["kl"]))[:3]
    assert sorted(ranked) == sorted(top3)
