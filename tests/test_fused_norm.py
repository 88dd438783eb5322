"""The fused residual-add + RMSNorm kernel (``kernels/add_rms_norm.py``) against transformers'
LlamaRMSNorm, and the decode loop with ``QPIPE_FUSED_NORM=1`` against the loop without it:
SmolLM2's real weights eager, a tiny model compiled with fullgraph (the op traced, no graph
break). On CPU the kernel runs in Triton's interpreter, in a child process (switched on before
triton is imported)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests.conftest import random_llama, run_interpreted

# (rows shape, hidden): odd widths (not a power of two: a masked tail), a 3-D batch
SHAPES = [((3,), 576), ((2, 5), 320), ((1,), 4096)]
DTYPES = ["float32", "bfloat16", "float16"]
STEPS = 4  # greedy tokens on SmolLM2: the prefill's, then 3 decode steps


def _kernel_errors(device: str = "cpu") -> dict:
    """Per dtype: whether h is bitwise torch's add, and y's largest error relative to
    transformers' LlamaRMSNorm on the same sum (in units of the dtype's epsilon)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qpipe.kernels.add_rms_norm import add_rms_norm

    gen = torch.Generator().manual_seed(0)
    out = {}
    for name in DTYPES:
        dtype = getattr(torch, name)
        h_exact, worst, h_worst = True, 0.0, 0.0
        for rows, n in SHAPES:
            x = (torch.randn(*rows, n, generator=gen) * 3).to(device, dtype)
            r = (torch.randn(*rows, n, generator=gen) * 5).to(device, dtype)
            norm = LlamaRMSNorm(n, eps=1e-5).to(device, dtype).requires_grad_(False)
            norm.weight.data = (torch.rand(n, generator=gen) * 2).to(device, dtype)
            y, h = add_rms_norm(x, r, norm.weight, norm.variance_epsilon)
            ref_h = r + x
            ref_y = norm(ref_h)
            assert y.shape == ref_y.shape and y.dtype == ref_y.dtype
            h_exact &= bool(torch.equal(h, ref_h))
            h_err = (h.double() - ref_h.double()).abs() / ref_h.double().abs().clamp_min(1e-3)
            h_worst = max(h_worst, float(h_err.max()) / torch.finfo(dtype).eps)
            rel = (y.double() - ref_y.double()).abs() / ref_y.double().abs().clamp_min(1e-3)
            worst = max(worst, float(rel.max()) / torch.finfo(dtype).eps)
        out[name] = {"h_exact": h_exact, "h_eps": h_worst, "y_eps": worst}
    return out


def _check_errors(out: dict) -> None:
    for name in DTYPES:
        assert out[name]["h_exact"], (name, out)  # the add rounds once, like torch's
        # The only difference is the order of the fp32 sum of squares: the normalized row can
        # round the other way in its dtype, and the weight's product once more: 2 eps at most.
        assert out[name]["y_eps"] <= 2.0, (name, out)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """The interpreted checks below, in one child process (one start of torch)."""
    return json.loads(run_interpreted(__file__, "--interpret").strip().splitlines()[-1])


def test_interpreted_kernel_matches_transformers_rmsnorm(interpreted) -> None:
    _check_errors(interpreted["kernel"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernel_matches_transformers_rmsnorm() -> None:
    _check_errors(_kernel_errors("cuda"))


def _smollm2_decoding() -> dict:
    """SmolLM2's real weights in bf16: qpipe's eager static-cache loop at batch 1, the fused
    layers off and on (counting the kernel's calls)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qpipe.kernels.add_rms_norm as kernel
    from qpipe.config.compose import load_model_group
    from qpipe.evaluation import decode
    from qpipe.evaluation.fused_norm import fused_norm
    from qpipe.models import materialize

    folder = materialize(load_model_group("smollm2"))
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is a city where", return_tensors="pt").input_ids
    calls = [0]
    run = kernel.add_rms_norm

    def counting(*args):
        calls[0] += 1
        return run(*args)

    kernel.add_rms_norm = counting
    out = {"layers": model.config.num_hidden_layers}
    decoder = decode.StaticDecoder(model, ids.shape[1] + STEPS + 1, compiled=False)
    for enabled in (False, True):
        with torch.inference_mode(), fused_norm(model, enabled) as fused:
            first = decoder.prefill({"input_ids": ids})
            rest = decoder.continue_from(first, ids.shape[1], STEPS - 1)
        tokens = [int(t[0, 0]) for t in (first, *rest)]
        out[str(int(enabled))] = {"tokens": tokens, "fused": fused, "calls": calls[0]}
        calls[0] = 0
    # the patch is undone: the layers run the class's forward again
    out["restored"] = all("forward" not in vars(m) for m in model.modules())
    return out


def test_interpreted_smollm2_greedy_is_unchanged_by_the_switch(interpreted) -> None:
    out = interpreted["smollm2"]
    off, on = out["0"], out["1"]
    assert not off["fused"] and off["calls"] == 0
    assert on["fused"] and on["tokens"] == off["tokens"] and len(on["tokens"]) == STEPS, out
    assert on["calls"] == 2 * out["layers"] * STEPS, out  # two a layer per model run
    assert out["restored"]


def _compiled_tiny() -> dict:
    """A tiny fp16 Llama decoding eager and compiled with fullgraph, the switch on: the same
    tokens, and the op traced (two a layer) in the step with no graph break."""
    from qpipe.evaluation import decode
    from qpipe.evaluation.fused_norm import ENV

    os.environ[ENV] = "1"
    model = random_llama(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
    ).half()
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    eager = decode.measure(model, {"input_ids": ids}, 4, compiled=False, repeats=1).tokens
    ops: list[str] = []

    def recording(gm, example_inputs):  # a Dynamo backend that notes the graph's ops
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    os.environ[ENV] = "0"
    unfused = decode.measure(model, {"input_ids": ids}, 4, compiled=False, repeats=1).tokens
    os.environ[ENV] = "1"
    compiled = decode.measure(
        model, {"input_ids": ids}, 4, compiled=True, repeats=1, backend=recording
    ).tokens
    nodes = sum("add_rms_norm" in op for op in ops)
    return {"eager": eager, "unfused": unfused, "compiled": compiled, "nodes": nodes}


def test_interpreted_compiled_step_traces_the_op(interpreted) -> None:
    out = interpreted["compiled"]
    assert out["nodes"] == 4, out  # one graph (fullgraph), two a layer
    assert out["compiled"] == out["eager"] == out["unfused"] and len(out["eager"]) == 4, out


def _qwen3_logits() -> dict:
    """A tiny random Qwen3 (q/k norms, untied head) in fp32: its logits with the fused layers
    against without, one forward over a prompt."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from qpipe.evaluation.fused_norm import fused_norm

    torch.manual_seed(0)
    config = Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = model(ids).logits
        with fused_norm(model, True) as fused:
            patched = model(ids).logits
    return {"fused": fused, "max_diff": float((plain - patched).abs().max())}


def test_interpreted_qwen3_layers_give_the_same_logits(interpreted) -> None:
    out = interpreted["qwen3"]
    # fp32: only the order of the sum of squares differs (logits are O(1) here)
    assert out["fused"] and out["max_diff"] < 1e-4, out


@pytest.mark.parametrize("switch", ["", "0"])
def test_switch_is_off_by_default(monkeypatch, switch) -> None:
    from qpipe.evaluation.fused_norm import ENV, fused_norm

    monkeypatch.setenv(ENV, switch)
    model = random_llama(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
    )
    with fused_norm(model) as on:
        assert not on and all("forward" not in vars(m) for m in model.modules())


if __name__ == "__main__" and "--interpret" in sys.argv:
    found = {"kernel": _kernel_errors(), "compiled": _compiled_tiny(), "qwen3": _qwen3_logits()}
    print(json.dumps({**found, "smollm2": _smollm2_decoding()}))
