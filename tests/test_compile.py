"""QuantLinear under torch.compile: one custom op, no graph breaks, the same numbers; and the
static-cache decode loop (qpipe.evaluation.decode) giving the tokens transformers' own greedy search gives.

On CPU the Triton kernel runs through Triton's interpreter, which must be switched on before
triton is imported: those cases run in a child process (like test_kernels_triton.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qpipe.kernels import QuantLinear
from tests.conftest import compose_config, run_interpreted


def _quant_mlp(kernel: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = torch.nn.Sequential(
        torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 64, bias=False)
    )
    layers = [
        QuantLinear.from_linear(dense[0], group_size=32, symmetric=False, kernel=kernel),
        torch.nn.GELU(),
        QuantLinear.from_linear(dense[2], group_size=32, symmetric=True, kernel=kernel),
    ]
    return torch.nn.Sequential(*layers).to(dtype)


def test_fake_implementation_gives_shape_and_dtype() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    ql = QuantLinear.from_linear(torch.nn.Linear(64, 48), group_size=32, symmetric=False)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(5, 64, dtype=torch.bfloat16))
        args = [mode.from_tensor(t) for t in (ql.qweight, ql.scales, ql.zeros, ql.bias)]
        y = torch.ops.qpipe.w4a16_linear(x, *args, 32)
    assert tuple(y.shape) == (5, 48) and y.dtype == torch.bfloat16


def test_torch_kernel_path_compiles_with_no_graph_break() -> None:
    model = _quant_mlp("torch", torch.float32)
    x = torch.randn(3, 7, 96)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def _interpreted_child() -> dict:
    """Runs with TRITON_INTERPRET=1: the custom op reaches the Triton kernel on CPU tensors."""
    torch._dynamo.reset()
    model = _quant_mlp("triton", torch.float16)
    x = torch.randn(2, 96).half()
    explained = torch._dynamo.explain(model)(x)
    graph = explained.graphs[0]
    ops = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    return {
        "graph_breaks": explained.graph_break_count,
        "graphs": explained.graph_count,
        "custom_ops": sum("qpipe.w4a16_linear" in op for op in ops),
        "max_abs_diff": (compiled.float() - eager.float()).abs().max().item(),
        "eager_finite": bool(torch.isfinite(eager).all()),
    }


def test_triton_path_is_one_custom_op_per_layer_and_matches_eager() -> None:
    stdout = run_interpreted(__file__, "--interpret", timeout=600)
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["graph_breaks"] == 0 and out["graphs"] == 1
    assert out["custom_ops"] == 2
    assert out["eager_finite"] and out["max_abs_diff"] == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_compiled_cuda_graph_matches_eager(dtype) -> None:
    """Inductor + CUDA graphs (what the decode loop uses): tuned in eager warm-up, then
    captured; replays agree with eager on fresh inputs."""
    model = _quant_mlp("triton", dtype).cuda()
    x = torch.randn(4, 96, device="cuda", dtype=dtype)
    model(x)  # tune + size the workspace before capture
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        compiled(x)
    x2 = torch.randn_like(x)
    torch.testing.assert_close(compiled(x2).clone(), model(x2), rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_llama_w4():
    """tiny_llama with every block Linear (and the untied lm_head) on QuantLinear."""
    from transformers import AutoModelForCausalLM

    from qpipe.models.source import load_config

    cfg = compose_config("model=tiny_llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config(cfg.model)).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, leaf = name.rpartition(".")
            q = QuantLinear.from_linear(module, group_size=32, symmetric=False, dtype=torch.float32)
            setattr(model.get_submodule(parent) if parent else model, leaf, q)
    return model


def test_static_decoder_matches_generate_eager_and_compiled(tiny_llama_w4) -> None:
    from qpipe.evaluation import decode

    model = tiny_llama_w4
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model.generate(
            input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0
        )[0, 12:].tolist()
    tokens, gaps = decode.reference_continuation(model, {"input_ids": ids}, 5)
    assert tokens == ref and len(gaps) == 5 and min(gaps) >= 0.0
    eager = decode.measure(model, {"input_ids": ids}, 5, compiled=False, repeats=1, reference=ref)
    compiled = decode.measure(
        model, {"input_ids": ids}, 5, compiled=True, repeats=1, backend="aot_eager", reference=ref
    )
    assert eager.tokens == ref and compiled.tokens == ref
    # stepped on the reference's history, the same graph gives the same choices
    assert eager.forced == ref and compiled.forced == ref
    assert eager.batch == 2 and eager.decode_tok_s > 0 and compiled.compile_s > 0
    found = decode.agreement(compiled, ref, gaps)
    assert (found.free_running, found.forced, found.first_divergence) == (5, 5, None)


def test_agreement_tells_a_cascade_from_wrong_steps() -> None:
    """One tie at step 1 shifts a free-running sequence (every later position differs), while
    the forced choices, each made on the reference's history, still agree but at the tie."""
    from qpipe.evaluation.decode import DecodeTiming, agreement

    reference, gaps = [5, 7, 8, 9, 4], [1.0, 0.0, 2.0, 1.5, 3.0]
    timing = DecodeTiming("compiled", 1, 12, 5, 1.0, 1.0, 1.0, 1.0)
    timing.tokens, timing.forced = [5, 6, 7, 8, 9], [5, 6, 8, 9, 4]
    found = agreement(timing, reference, gaps)
    assert (found.free_running, found.first_divergence, found.gap_at_divergence) == (1, 1, 0.0)
    assert (found.forced, found.forced_misses, found.forced_miss_gaps) == (4, [1], [0.0])


def test_decode_modes_and_batch_sizes_follow_the_device() -> None:
    from qpipe.config.compose import decode_batch_sizes
    from qpipe.errors import ConfigError
    from qpipe.evaluation.decode import modes_for
    from qpipe.preflight import validate_config

    assert modes_for("both", "cuda") == ["eager", "compiled"]
    assert modes_for("both", "cpu") == ["eager"]
    cfg = compose_config()
    assert decode_batch_sizes(cfg, "cuda") == [1]  # one compilation by default
    assert decode_batch_sizes(cfg, "cpu") == [1]
    assert decode_batch_sizes(compose_config("eval.decode_batch_sizes=[1,16]"), "cuda") == [1, 16]
    with pytest.raises(ConfigError, match="eval.decode='fast'"):
        validate_config(compose_config("eval.decode=fast"))
    with pytest.raises(ConfigError, match="eval.decode_batch_sizes"):
        validate_config(compose_config("eval.decode_batch_sizes=[0]"))


@pytest.mark.slow
def test_untied_lm_head_is_quantized_when_not_excluded(tmp_path) -> None:
    """exclude.lm_head=false: the untied head becomes a QuantLinear and decoding still runs."""
    from qpipe.app import run_pipeline

    cfg = compose_config(
        "model=tiny_llama",
        "quant=rtn",
        "quant.format=qpipe-w4",
        "exclude.lm_head=false",
        "eval=quick",
        "eval.max_new_tokens=4",
        "workload.context_len=64",
        "mlflow.experiment=lm_head",
    )
    report = run_pipeline(cfg, tmp_path / "run")
    assert report.status == "FINISHED", report.error
    from qpipe.backends.qlinear_loader import load_checkpoint

    checkpoint = report.results["quantize"].outputs["checkpoint"]
    model = load_checkpoint(Path(checkpoint), "AutoModelForCausalLM", "cpu", torch.float32, "torch")
    assert isinstance(model.lm_head, QuantLinear)
    assert report.metrics["perf.decode_tok_s_eager"] > 0
    # the load stage ran q/k/v and gate/up of every layer as one matmul each
    assert report.metrics["load.fused_projections"] == 2 * 4
    tied = compose_config("model=tiny_llama", "model.config.tie_word_embeddings=true")
    from qpipe.memory import build_inventory
    from qpipe.memory.exclusion import plan_precision
    from qpipe.models.source import load_config

    inventory = build_inventory(load_config(tied.model), "AutoModelForCausalLM")
    plan = plan_precision(inventory, {"lm_head": False}, quantize=True)
    assert "lm_head" not in plan.targets and "tied" in plan.skip["lm_head"]


if __name__ == "__main__" and "--interpret" in sys.argv:
    print(json.dumps(_interpreted_child()))
