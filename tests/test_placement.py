"""Models bigger than one card: device maps and per-device budgets priced on the meta device
(no weights), the checks on bad hardware/placement values, and the GPU measurement."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from qpipe.app import run_pipeline
from qpipe.errors import ConfigError
from qpipe.memory import Workload, arch_dims, build_inventory
from qpipe.memory.estimator import activation_bytes, kv_cache_bytes
from qpipe.memory.exclusion import plan_precision
from qpipe.memory.placement import device_of, meta_model, plan_placement
from qpipe.models import load_config
from qpipe.preflight import validate_config
from tests.conftest import compose_config

INTERNVL = ("model=internvl", "model.weights=random", "pipeline=estimate")


def _budget(*overrides: str, tmp_path) -> tuple[object, dict]:
    report = run_pipeline(compose_config(*INTERNVL, *overrides), tmp_path / "run")
    return report, report.results["memory_budget"].outputs


def test_three_small_cards_share_internvl_and_every_module_is_placed(tmp_path) -> None:
    report, out = _budget("hardware=rtx4060_8gb", "hardware.count=3", tmp_path=tmp_path)
    assert report.status == "FINISHED", report.error
    placement = out["placement"]
    gpus = [d for d in placement["devices"] if d["device"].startswith("cuda")]
    assert [d["device"] for d in gpus] == ["cuda:0", "cuda:1", "cuda:2"]
    assert all(d["fits"] and d["total_gb"] <= d["usable_gb"] for d in gpus)
    # Every weight lands somewhere once: the shares add up to the single-card estimate.
    est = out["estimate"]
    assert sum(d["weights_gb"] for d in gpus) == pytest.approx(
        est["weights_gb"] + est["buffers_gb"], rel=1e-6
    )
    # The 36 decoder layers are split, none twice, and the KV cache follows its layers.
    layers = [i for d in gpus for i in d["layers"]]
    assert sorted(layers) == list(range(36))
    assert sum(d["kv_cache_gb"] for d in gpus) == pytest.approx(est["kv_cache_gb"])
    assert all(len(d["layers"]) >= 5 for d in gpus)  # balanced, not "fill the first card"
    assert placement["device_map"]["lm_head"] == "cuda:2"
    assert report.metrics["mem.cuda1.est_peak_gb"] == pytest.approx(gpus[1]["peak_gb"])


def test_a_model_that_fits_one_card_stays_on_it(tmp_path) -> None:
    report, out = _budget("hardware=rtx4090_24gb", "hardware.count=2", tmp_path=tmp_path)
    assert report.status == "FINISHED"
    assert out["placement"] is None and out["fits"] is True
    forced = run_pipeline(
        compose_config(
            *INTERNVL, "hardware=rtx4090_24gb", "hardware.count=2", "placement.device_map=balanced"
        ),
        tmp_path / "forced",
    )
    devices = forced.results["memory_budget"].outputs["placement"]["devices"]
    assert [d["device"] for d in devices] == ["cuda:0", "cuda:1"]
    assert all(d["weights_gb"] > 5 for d in devices)


def test_two_cards_too_small_stop_with_each_cards_numbers(tmp_path) -> None:
    report, _ = _budget("hardware=rtx4060_8gb", "hardware.count=2", tmp_path=tmp_path)
    assert report.status == "FAILED" and report.failed_stage == "memory_budget"
    assert "does not fit its device map" in report.error
    assert "hardware.offload_gb" in report.error


def test_offload_caps_the_gpu_and_prices_the_streamed_weights(tmp_path) -> None:
    report, out = _budget(
        "hardware=h100_80gb",
        "placement.max_memory_gb=12",
        "hardware.offload_gb=64",
        tmp_path=tmp_path,
    )
    assert report.status == "FINISHED", report.error
    placement = out["placement"]
    gpu, host = placement["devices"]
    assert gpu["device"] == "cuda:0" and host["device"] == "cpu"
    assert gpu["usable_gb"] == 12 and gpu["total_gb"] <= 12
    est = out["estimate"]
    assert gpu["weights_gb"] + host["weights_gb"] == pytest.approx(
        est["weights_gb"] + est["buffers_gb"], rel=1e-6
    )
    assert host["weights_gb"] > 4  # ≈ 17 GB of bf16 weights, 12 GB of GPU
    # Offloaded layers run on the main GPU: the whole KV cache is there.
    assert gpu["kv_cache_gb"] == pytest.approx(est["kv_cache_gb"])
    # accelerate streams one offloaded leaf at a time; the largest is lm_head (151936 × 4096).
    assert placement["device_map"]["lm_head"] == "cpu"
    assert gpu["offload_transient_gb"] == pytest.approx(
        151936 * 4096 * 2 / 1e9 - gpu["activations_gb"], rel=1e-3
    )
    assert report.metrics["mem.est_offload_gb"] == pytest.approx(host["weights_gb"])


def test_the_map_is_accelerates_own_for_unquantized_weights() -> None:
    """With no quantization, qpipe's sizes equal transformers' own, so the map must be exactly
    what ``from_pretrained(device_map="balanced", max_memory=...)`` computes."""
    from transformers.integrations.accelerate import _get_device_map

    model_cfg = compose_config("model=internvl", "model.weights=random").model
    config = load_config(model_cfg)
    inv = build_inventory(config, model_cfg.model_class)
    plan = plan_precision(inv, {}, quantize=False)
    work = Workload(context_len=2048)
    placement = plan_placement(
        meta_model(config, model_cfg.model_class),
        inv,
        plan,
        {"method": "none", "name": "none"},
        arch_dims(config),
        work,
        2,
        usable_gb=[10.0, 10.0],
        capacity_gb=[24.0, 24.0],
        runtime_gb=0.5,
        offload_gb=0,
    )
    with torch.device("meta"):
        import transformers

        bf16 = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    # qpipe sets the CUDA context, the KV cache and the activations aside from each card.
    dims = arch_dims(config)
    reserve = 0.5e9 + kv_cache_bytes(dims, work, 2) + activation_bytes(dims, work, 2)
    budget = {i: int(10e9 - reserve) for i in (0, 1)}
    assert placement.device_map == dict(_get_device_map(bf16, "balanced", budget, None))
    assert device_of("model.language_model.layers.3.mlp.up_proj", placement.device_map) == 0


def test_quantized_modules_are_priced_in_their_format(tmp_path) -> None:
    report, out = _budget(
        "hardware=rtx4060_8gb",
        "hardware.count=2",
        "quant=bnb_nf4",
        "placement.device_map=balanced",
        tmp_path=tmp_path,
    )
    assert report.status == "FINISHED", report.error
    gpus = out["placement"]["devices"]
    est = out["estimate"]
    total = sum(d["weights_gb"] for d in gpus)
    assert total == pytest.approx(est["weights_gb"] + est["buffers_gb"], rel=1e-6)
    assert total < 8  # nf4: about 6.7 GB, not bf16's 17


def test_qpipe_kernels_cannot_be_spread_and_say_so(tmp_path) -> None:
    report, _ = _budget(
        "hardware=rtx4060_8gb",
        "hardware.count=2",
        "quant=rtn",
        "placement.device_map=balanced",
        tmp_path=tmp_path,
    )
    assert report.status == "FAILED" and "kernel=hf" in report.error


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("hardware.count=0", "hardware.count=0"),
        ("hardware.count=two", "hardware.count='two'"),
        ("hardware.offload_gb=-1", "hardware.offload_gb=-1"),
        ("placement.device_map=spread", "placement.device_map='spread'"),
        ("placement.max_memory_gb=[12,0]", "placement.max_memory_gb"),
        ("placement.gpus_per_job=-1", "placement.gpus_per_job=-1"),
    ],
)
def test_bad_placement_values_are_one_line_errors(override: str, needle: str) -> None:
    cfg = compose_config(*INTERNVL, override)
    with pytest.raises(ConfigError, match="valid|must") as err:
        validate_config(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_memory_list_must_match_the_count(tmp_path) -> None:
    cfg = compose_config(*INTERNVL, "hardware=rtx4090_24gb", "hardware.count=3")
    cfg.hardware.memory_gb = OmegaConf.create([24, 24])
    with pytest.raises(ConfigError, match="lists 2 cards but hardware.count=3"):
        validate_config(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tiny_llama_sharded_over_two_gpus_is_measured_per_gpu(tmp_path) -> None:
    cfg = compose_config(
        "model=tiny_llama",
        "eval=quick",
        "placement.device_map=balanced",
        "hardware.count=2",
        "dtype=bfloat16",
    )
    report = run_pipeline(cfg, tmp_path / "run")
    assert report.status == "FINISHED", report.error
    for gpu in ("cuda0", "cuda1"):
        assert report.metrics[f"mem.{gpu}.measured_peak_gb"] > 0
        assert f"mem.{gpu}.est_error_pct" in report.metrics


def test_gptq_of_a_model_larger_than_the_card_is_budgeted_layer_by_layer(tmp_path) -> None:
    small, out = _budget("hardware=rtx3060_12gb", "quant=gptq", tmp_path=tmp_path)
    assert small.status == "FINISHED", small.error
    q = out["quantize"]
    assert q["layer_by_layer"] is True and q["onload"]["largest_subgraph"].startswith("layer")
    # One Qwen3-8B layer in bf16, and fp32 Hessians of its 7 Linears (6 × 4096², 12288²).
    assert q["onload"]["subgraph_weights_gb"] == pytest.approx(0.386, abs=0.001)
    assert q["onload"]["hessians_gb"] == pytest.approx((6 * 4096**2 + 12288**2) * 4 / 1e9)
    assert q["gpu_gb"] < 2.5 < 17 < q["whole_model_gb"]
    assert small.metrics["mem.est_quantize_gpu_gb"] == pytest.approx(q["gpu_gb"])
    big, out = _budget("hardware=h100_80gb", "quant=gptq", tmp_path=tmp_path)
    assert out["quantize"]["layer_by_layer"] is False
    assert out["quantize"]["gpu_gb"] == pytest.approx(out["quantize"]["whole_model_gb"])
    _, awq = _budget("hardware=rtx3060_12gb", "quant=awq", tmp_path=tmp_path)
    # AWQ keeps no Hessians but the layer's outputs for all 32 × 256 calibration tokens.
    assert awq["quantize"]["onload"]["hessians_gb"] == 0
    assert awq["quantize"]["onload"]["cached_outputs_gb"] == pytest.approx(
        32 * 256 * 4096 * 2 / 1e9
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gptq_keeps_the_model_in_host_memory_and_onloads_layers(tmp_path) -> None:
    from qpipe.backends import QuantizeRequest, get_backend
    from tests.conftest import save_random_llama

    save_random_llama(
        tmp_path / "src",
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=1024,
    )
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "src").glob("*.safetensors"))
    request = QuantizeRequest(
        source=tmp_path / "src",
        model_class="AutoModelForCausalLM",
        quant=OmegaConf.to_container(compose_config("quant=gptq").quant),
        skip_modules=["lm_head"],
        targets=[],
        output_dir=tmp_path / "out",
        device="cuda",
        dtype=torch.float32,
        calib_seq_len=64,
        calib_samples=4,
        keep_in_host=True,
    )
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = get_backend("gptq").quantize(request)
    peak = torch.cuda.max_memory_allocated() - base
    assert (result.checkpoint / "config.json").is_file()
    assert 0 < peak < model_bytes / 3  # one layer (and its Hessians) at a time, not the model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_capped_gpu_offloads_to_host_memory_and_finishes(tmp_path) -> None:
    cfg = compose_config(
        "model=tiny_llama",
        "model.config.num_hidden_layers=24",  # layers small next to the 25 MB embeddings
        "eval=quick",
        "eval.baseline=false",
        "hardware.count=1",
        # A fixed context figure keeps the plan the same on every GPU: the embeddings and 9
        # layers stay on the GPU, the other 15 layers and lm_head go to host memory.
        "hardware.runtime_overhead_gb=0.1",
        "placement.max_memory_gb=0.2",
        "hardware.offload_gb=4",
    )
    report = run_pipeline(cfg, tmp_path / "run")
    assert report.status == "FINISHED", report.error
    placement = report.results["memory_budget"].outputs["placement"]
    assert "cpu" in placement["device_map"].values()
    assert report.metrics["mem.host_offloaded_gb"] > 0
    assert report.metrics["mem.cuda0.measured_peak_gb"] > 0


def test_a_map_over_gpus_this_machine_lacks_is_refused_before_loading() -> None:
    from qpipe.devices.peak_memory import device_map_for

    placement = {
        "device_map": {"model": "cuda:0", "lm_head": "cuda:1"},
        "devices": [{"device": "cuda:0"}, {"device": "cuda:1"}],
        "main_device": "cuda:0",
    }
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(ConfigError, match="sees .* GPU.*hardware.count"):
        device_map_for(placement, "cpu")
    assert device_map_for(None, "cpu") == (None, "cpu", None)


def test_offloaded_modules_decode_the_same_tokens_and_are_counted(tmp_path) -> None:
    """accelerate's offload hooks for real (on CPU the overflow goes to disk, where a GPU run
    sends it to host memory): qpipe's decode loop gives the same greedy tokens as the whole
    model, and the load metrics count the weights the hooks stream in."""
    from accelerate import dispatch_model

    from qpipe.backends.none import load_hf
    from qpipe.devices.measure import tensor_bytes
    from qpipe.devices.peak_memory import loaded_weights_metrics
    from qpipe.evaluation import decode
    from qpipe.models import materialize

    folder = materialize(compose_config("model=tiny_llama").model)
    whole = load_hf(folder, "AutoModelForCausalLM", "cpu", torch.float32)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    expected = decode.measure(whole, {"input_ids": ids}, 6, compiled=False, repeats=1).tokens
    total = tensor_bytes(whole)
    streamed = ["model.layers.2", "model.layers.3", "lm_head"]
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu"}
    device_map |= {"model.norm": "cpu", "model.rotary_emb": "cpu"} | dict.fromkeys(streamed, "disk")
    model = load_hf(folder, "AutoModelForCausalLM", "cpu", torch.float32)
    model = dispatch_model(model, device_map, main_device="cpu", offload_dir=str(tmp_path))
    got = decode.measure(model, {"input_ids": ids}, 6, compiled=False, repeats=1).tokens
    assert got == expected
    metrics = loaded_weights_metrics(model)
    assert metrics["mem.loaded_weights_gb"] == pytest.approx(total / 1e9, rel=1e-6)
    hooked = sum(tensor_bytes(whole.get_submodule(n)) for n in streamed)
    assert metrics["mem.host_offloaded_gb"] == pytest.approx(hooked / 1e9, rel=1e-6)
