"""The split-KV decode attention kernel against a float64 reference: grouped heads, several
batch rows and query positions, padding, fully masked rows, bf16/fp16. On CPU it runs
through Triton's interpreter in a child process (switched on before triton is imported)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import random_llama, run_interpreted

# (batch, heads, kv heads, new positions, cache length, head dim)
CASES = [(1, 8, 2, 1, 150, 32), (2, 8, 2, 3, 77, 64), (1, 4, 4, 1, 40, 16), (3, 16, 2, 2, 300, 32)]


def _case(b, h, hkv, s, length, d, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(b, n, ln, d, generator=gen) for n, ln in ((h, s), (hkv, length), (hkv, length))
    )
    # a static cache: position p of the new tokens may see slots 0..p; row 1 is left-padded
    pos = length - 20 - s + torch.arange(s)
    mask = (torch.arange(length)[None, :] <= pos[:, None])[None, None].repeat(b, 1, 1, 1)
    if b > 1:
        mask[1, :, :, :5] = False
    if b > 2:
        mask[2] = False  # a padded query: may attend to nothing
    to = {"dtype": dtype, "device": device}
    return q.to(**to), k.to(**to), v.to(**to), mask.to(device)


def _reference(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(groups, 1)
    vv = v.double().repeat_interleave(groups, 1)
    scores = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.nan_to_num(torch.softmax(scores, -1))  # rows with nothing to attend to: 0
    return (p @ vv).transpose(1, 2)


def _errors(dtype, device) -> list[float]:
    from qpipe.kernels.decode_attention import decode_attention
    from qpipe.kernels.ops import decode_attention_supported as supported

    errs = []
    for i, (b, h, hkv, s, length, d) in enumerate(CASES):
        q, k, v, mask = _case(b, h, hkv, s, length, d, dtype, device, seed=i)
        assert supported(q, k, mask)
        out = decode_attention(q, k, v, mask, d**-0.5)
        ref = _reference(q, k, v, mask, d**-0.5)
        assert out.shape == (b, s, h, d) and out.dtype == dtype
        errs.append(float((out.double() - ref.to(out.device)).abs().max()))
    return errs


def test_interpreted_kernel_matches_reference() -> None:
    errs = json.loads(run_interpreted(__file__, "--interpret").strip().splitlines()[-1])
    assert len(errs) == len(CASES) and max(errs) < 2e-3, errs


def test_unsupported_calls_are_refused() -> None:
    from qpipe.kernels.ops import decode_attention_supported as supported

    q = torch.zeros(1, 32, 1, 128, dtype=torch.bfloat16)
    k = torch.zeros(1, 8, 64, 128, dtype=torch.bfloat16)
    assert supported(q, k, None)  # one new position, no mask: attends to everything
    assert not supported(q.expand(1, 32, 3, 128), k, None)  # causal prompt: SDPA's job
    assert not supported(q.float(), k.float(), None)
    assert not supported(q, k, torch.zeros(1, 1, 1, 64))  # additive float mask
    assert not supported(torch.zeros(1, 32, 1, 96, dtype=torch.bfloat16), k, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_kernel_matches_reference(dtype) -> None:
    errs = _errors(dtype, "cuda")
    assert max(errs) < (4e-3 if dtype == torch.float16 else 2e-2), errs


def _compiled_decode_tokens() -> dict:
    """A tiny fp16 GQA model decoding eager (SDPA on folded heads) and compiled with fullgraph
    (the kernel, interpreted): the same tokens, and the op in the traced step."""
    from qpipe.evaluation import decode

    model = random_llama(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
    ).half()
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    eager = decode.measure(model, {"input_ids": ids}, 4, compiled=False, repeats=1).tokens
    ops: list[str] = []

    def recording(gm, example_inputs):  # a Dynamo backend that notes the graph's ops
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = decode.measure(
        model, {"input_ids": ids}, 4, compiled=True, repeats=1, backend=recording
    ).tokens
    kernel_nodes = sum("decode_attention" in op for op in ops)
    return {"eager": eager, "compiled": compiled, "kernel_nodes": kernel_nodes}


def test_interpreted_compiled_decode_uses_the_kernel() -> None:
    out = json.loads(run_interpreted(__file__, "--interpret-decode").strip().splitlines()[-1])
    assert out["kernel_nodes"] == 2  # the compiled step: one per layer, no graph break
    assert out["compiled"] == out["eager"] and len(out["eager"]) == 4


if __name__ == "__main__" and "--interpret" in sys.argv:
    print(json.dumps(_errors(torch.float16, "cpu")))
if __name__ == "__main__" and "--interpret-decode" in sys.argv:
    print(json.dumps(_compiled_decode_tokens()))
