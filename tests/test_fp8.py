"""quant=fp8: llm-compressor's FP8_DYNAMIC checkpoint loaded on qpipe's ``Fp8Linear``, priced
exactly, with the kernel its backend resolves (FP8 tensor cores on the GPU, weight-only on
CPU). The perplexity targets on SmolLM2's real weights are measured by
``bench/quality_smollm2.py --only fp8`` (CPU) and tests/test_decode_real_gpu.py (GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qpipe.backends import QuantizeRequest, get_backend, weight_format_of
from qpipe.config.compose import load_group
from qpipe.devices.measure import tensor_bytes
from qpipe.kernels.fp8_linear import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    fp8_tensor_cores,
    quantize_per_channel,
    quantize_per_token,
)
from qpipe.memory import Workload, arch_dims, build_inventory, estimate
from qpipe.memory.exclusion import plan_precision
from tests.conftest import save_random_llama


def test_per_channel_and_per_token_rounding_are_e4m3_with_exact_scales() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * 0.05
    q, scale = quantize_per_channel(w)
    assert q.dtype == FP8 and scale.shape == (48,) and scale.dtype == torch.float32
    # each row's largest weight lands on e4m3's largest value; the rest within its spacing
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((48,), FP8_MAX))
    err = (q.float() * scale[:, None] - w).abs() / w.abs().amax(dim=1, keepdim=True)
    assert float(err.max()) <= 2**-4  # e4m3: 3 mantissa bits, half a step relative
    x = torch.randn(5, 64, generator=g, dtype=torch.float32).to(torch.bfloat16)
    xq, xs = quantize_per_token(x)
    assert xq.dtype == FP8 and xs.shape == (5, 1) and xs.dtype == torch.float32
    back = xq.float() * xs
    assert float(((back - x.float()).abs() / x.float().abs().amax(1, keepdim=True)).max()) <= 2**-4


def test_weight_only_layer_is_the_dequantized_matmul() -> None:
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    q, scale = quantize_per_channel(w)
    layer = Fp8Linear(q, scale, b, torch.float32, kernel="scaled_mm")
    assert layer.kernel == "scaled_mm"  # 48 and 32: multiples of 16, the FP8 matmul takes them
    x = torch.randn(3, 7, 32, generator=g)
    want = torch.nn.functional.linear(x, q.float() * scale[:, None], b)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)  # CPU: weight-only
    odd = Fp8Linear(*quantize_per_channel(torch.randn(24, 40, generator=g)), None, torch.float32)
    assert Fp8Linear(odd.weight, odd.weight_scale, None, torch.float32, "scaled_mm").kernel == (
        "torch"  # N = 24: not a multiple of 16, so it runs weight-only wherever it is
    )


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A small Llama through llm-compressor's FP8_DYNAMIC scheme (data-free), its lm_head
    kept in high precision as exclude_layers keeps it."""
    folder = save_random_llama(
        tmp_path_factory.mktemp("llama"),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        tie_word_embeddings=False,
    )
    quant = OmegaConf.to_container(load_group("quant", "fp8"))
    backend = get_backend("fp8")
    assert backend.unavailable_reason(quant, "cpu") is None
    out = tmp_path_factory.mktemp("fp8")
    from transformers import AutoConfig

    inventory = build_inventory(AutoConfig.from_pretrained(folder), "AutoModelForCausalLM")
    plan = plan_precision(inventory, {"lm_head": True, "embeddings": True}, True)
    result = backend.quantize(
        QuantizeRequest(
            source=folder,
            model_class="AutoModelForCausalLM",
            quant=quant,
            skip_modules=sorted(plan.skip),
            targets=plan.targets,
            output_dir=out,
            device="cpu",
            dtype=torch.float32,
        )
    )
    return folder, result.checkpoint, quant


def test_fp8_checkpoint_is_compressed_tensors_and_loads_on_fp8linear(fp8_checkpoint) -> None:
    folder, checkpoint, quant = fp8_checkpoint
    qcfg = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "float-quantized"
    group = next(iter(qcfg["config_groups"].values()))
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["dynamic"] and group["input_activations"]["strategy"] == (
        "token"
    )
    backend = get_backend("fp8")
    kernel = backend.resolve_kernel("auto", quant, "cpu")
    assert kernel == "torch"  # no FP8 tensor cores on a CPU: weight-only
    ours = backend.load(checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, kernel)
    layers = [m for m in ours.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 2 * 7 and {m.kernel for m in layers} == {"torch"}
    assert isinstance(ours.lm_head, torch.nn.Linear)
    # transformers' own loader of the same folder (compressed-tensors): the same weights...
    plain = backend.load(checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "hf")
    for name, module in ours.named_modules():
        if isinstance(module, Fp8Linear):
            theirs = plain.get_submodule(name)
            want = theirs.weight.float() * theirs.weight_scale.float()
            torch.testing.assert_close(module.dequantize(), want, rtol=0, atol=0)
    # ...and logits apart only by the activations' e4m3 rounding, which it emulates (W8A8)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, plain(ids).logits
    assert float((a - b).norm() / b.norm()) < 0.05


def test_fp8_weights_are_priced_as_they_load(fp8_checkpoint) -> None:
    from transformers import AutoConfig

    folder, checkpoint, quant = fp8_checkpoint
    config = AutoConfig.from_pretrained(folder)
    inventory = build_inventory(config, "AutoModelForCausalLM")
    plan = plan_precision(inventory, {"lm_head": True, "embeddings": True}, True)
    est = estimate(
        inventory, plan, weight_format_of(quant, 4, "cpu"), arch_dims(config), Workload(), 4
    )
    model = get_backend("fp8").load(
        checkpoint, "AutoModelForCausalLM", "cpu", torch.float32, "torch"
    )
    assert (est.weights_gb + est.buffers_gb) * 1e9 == pytest.approx(tensor_bytes(model), rel=1e-3)
    # the weight-only matmul holds its dequantized weight; FP8's its quantized activations
    shape, tokens = (256, 128), 2048
    weight_only = weight_format_of(quant, 2, "cpu").matmul_transient_bytes(shape, tokens)
    tensor_core = weight_format_of(quant, 2, "cuda", "scaled_mm").matmul_transient_bytes(
        shape, tokens
    )
    assert weight_only == 256 * 128 * 2 and tensor_core == tokens * 128 * 5 + tokens * 4


@pytest.mark.gpu
@pytest.mark.skipif(not fp8_tensor_cores(), reason="needs a GPU with FP8 tensor cores")
def test_scaled_mm_matches_the_dequantized_matmul_on_the_gpu() -> None:
    """The FP8 tensor-core path against the same weights dequantized (its only other error is
    the activations' own e4m3 rounding: about 2 % per element, far less over a dot product),
    eager, compiled and in a CUDA graph."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, n, k in ((1, 4096, 4096), (16, 6144, 4096), (257, 1024, 12288)):
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        q, scale = quantize_per_channel(w)
        # gemv=False: _scaled_mm at M = 1 too (tests/test_e4m3_gemv.py has the decode GEMV)
        layer = Fp8Linear(q, scale, None, torch.bfloat16, kernel="scaled_mm", gemv=False)
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        ref = x.float() @ (q.float() * scale[:, None]).t()
        got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        rel = float((got.float() - ref).norm() / ref.norm())
        assert rel < 3e-2, (m, n, k, rel)
        compiled = torch.compile(layer, fullgraph=True)(x)
        # the same e4m3 codes (one rounding from fp32 in both): the products agree to bf16
        same = float((compiled.float() - got.float()).norm() / got.float().norm())
        assert same < 1e-2, (m, n, k, same)
