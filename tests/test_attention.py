"""grouped_sdpa: GQA without expanding the KV cache gives transformers' sdpa numbers, for a
prompt with padding (mask tiled over the folded query axis) and for static-cache decoding."""

from __future__ import annotations

import pytest
import torch

from qpipe.evaluation import attention, decode
from tests.conftest import random_llama


@pytest.fixture(scope="module")
def gqa_model():
    return random_llama(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=500,
    )


def _counting(monkeypatch) -> list[int]:
    folded: list[int] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, *args, **kwargs):
        folded.append(int(q.shape[1] == k.shape[1] and q.shape[1] < 8))
        return real(q, k, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return folded


def test_padded_prompt_matches_sdpa(gqa_model, monkeypatch) -> None:
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: transformers builds a 4-D mask
    with torch.inference_mode():
        ref = gqa_model(ids, attention_mask=mask).logits
        folded = _counting(monkeypatch)
        with attention.grouped_attention(gqa_model) as switched:
            out = gqa_model(ids, attention_mask=mask).logits
    assert switched and gqa_model.config._attn_implementation == "sdpa"
    assert folded and all(folded), folded
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 3:], ref[1, 3:], rtol=1e-5, atol=1e-5)


def test_static_cache_decoding_is_unchanged(gqa_model, monkeypatch) -> None:
    ids = torch.randint(0, 500, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = gqa_model.generate(
            input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
        )[0, 11:].tolist()
    folded = _counting(monkeypatch)
    timing = decode.measure(gqa_model, {"input_ids": ids}, 6, compiled=False, repeats=1)
    assert timing.tokens == ref
    # the prompt has no mask (causal, transformers' own path); every decode step, 2 layers
    # each, attends through the folded heads
    assert sum(folded) >= 2 * 5, folded
    assert gqa_model.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compiled_decode_step_through_the_kernel_matches_sdpa(gqa_model) -> None:
    """A compiled static-cache decode step on the GPU attends through qpipe's split-KV kernel
    and gives transformers' sdpa logits."""
    from transformers import StaticCache

    model = gqa_model.to("cuda", torch.float16)
    ids = torch.randint(0, 500, (2, 13), generator=torch.Generator().manual_seed(3)).cuda()
    ops: list[str] = []

    def recording(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def step_logits(grouped: bool) -> torch.Tensor:
        cache = StaticCache(config=model.config, max_cache_len=40)
        with torch.inference_mode():
            out = model(ids, past_key_values=cache, cache_position=torch.arange(13).cuda())
            token = out.logits[:, -1].argmax(-1, keepdim=True)

            def step(tok, pos):
                return model(input_ids=tok, past_key_values=cache, cache_position=pos).logits

            position = torch.tensor([13]).cuda()
            if not grouped:
                return step(token, position)
            with attention.grouped_attention(model):
                torch._dynamo.reset()
                return torch.compile(step, backend=recording, fullgraph=True)(token, position)

    try:
        ref = step_logits(False)
        out = step_logits(True)
    finally:
        model.to("cpu", torch.float32)
    assert sum("decode_attention" in op for op in ops) == model.config.num_hidden_layers
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
