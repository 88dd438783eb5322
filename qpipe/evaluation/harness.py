"""The measurement harness: perplexity, greedy samples, embeddings (decode speed: decode.py).

Every backend and the unquantized baseline go through the same functions, so their numbers
compare.
"""

from __future__ import annotations

import math

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def perplexity(model, ids: torch.Tensor, window: int, device: str) -> float:
    """exp(mean NLL) over non-overlapping windows of ``window`` tokens (each window scored
    from its own start, so every token is predicted from at most ``window - 1`` tokens)."""
    nll_sum, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start : start + window].unsqueeze(0).to(device)
            if chunk.numel() < 2:
                break
            logits = model(input_ids=chunk).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            nll_sum += loss.item()
            count += chunk.numel() - 1
    return math.exp(nll_sum / count)


def _generate(model, ids: torch.Tensor, new_tokens: int, pad_id: int) -> torch.Tensor:
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )


def greedy_sample(model, tokenizer, prompt: str, new_tokens: int, device: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        out = _generate(model, ids, new_tokens, tokenizer.pad_token_id or 0)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def sentence_embeddings(model, tokenizer, sentences: list[str], device: str) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (the sentence-transformers recipe for MiniLM)."""
    batch = tokenizer(
        sentences, padding=True, truncation=True, max_length=256, return_tensors="pt"
    ).to(device)
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1).cpu()


def eval_sentences(text: str, count: int = 64) -> list[str]:
    """Sentence-sized pieces of the evaluation text, for encoder quality checks."""
    pieces = [p.strip() for p in text.replace("\n", " ").split(".") if len(p.strip()) > 30]
    return pieces[:count]
