"""benchmark: quality (perplexity, or embedding agreement for encoders), prefill latency
(TTFT), decode tokens/s at several batch sizes, and a greedy sample logged as text."""

from __future__ import annotations

import torch

from qpipe.evaluate import (
    eval_sentences,
    generation_speed,
    greedy_sample,
    sentence_embeddings,
)
from qpipe.quality import quality_metrics
from qpipe.stages.base import StageContext, StageResult
from qpipe.textdata import read_text


def _encoder(ctx: StageContext, model, tokenizer, device: str, text: str) -> StageResult:
    emb = sentence_embeddings(model, tokenizer, eval_sentences(text), device)
    metrics: dict[str, float] = {}
    reference = ctx.output("baseline", "embeddings")
    if reference:
        cos = (emb * torch.load(reference)).sum(-1)
        metrics["quality.embed_cosine_mean"] = cos.mean().item()
        metrics["quality.embed_cosine_min"] = cos.min().item()
    return StageResult(outputs={"sentences": emb.shape[0]}, metrics=metrics)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    ev = cfg.eval
    model = ctx.obj("load", "model")
    tokenizer = ctx.obj("load", "tokenizer")
    device = ctx.output("load", "device")
    text = read_text(ev.text)
    if cfg.model.get("task", "causal-lm") == "feature-extraction":
        return _encoder(ctx, model, tokenizer, device, text)

    baseline = ctx.inputs.get("baseline")
    metrics, quality = quality_metrics(
        model, tokenizer, ev, device, baseline.outputs if baseline else {}
    )
    ppl = metrics["quality.ppl"]

    speeds = {}
    for batch in ev.decode_batch_sizes:
        s = generation_speed(
            model,
            tokenizer,
            text,
            int(ev.prefill_tokens),
            int(ev.max_new_tokens),
            int(batch),
            int(ev.repeats),
            device,
        )
        speeds[int(batch)] = s
        metrics[f"perf.decode_tok_s.b{batch}"] = s["decode_tok_s"]
    first = speeds[int(ev.decode_batch_sizes[0])]
    metrics.update(
        {
            "perf.ttft_ms": first["ttft_ms"],
            "perf.prefill_tok_s": first["prefill_tok_s"],
            "perf.decode_tok_s": first["decode_tok_s"],
        }
    )
    sample = greedy_sample(model, tokenizer, ev.prompt, int(ev.max_new_tokens), device)
    path = ctx.workdir / "sample.txt"
    path.write_text(f"{ev.prompt}{sample}\n")
    return StageResult(
        outputs={
            "ppl": ppl,
            "quality": quality,
            "speeds": speeds,
            "prompt": ev.prompt,
            "sample": sample,
        },
        metrics=metrics,
        artifacts=[path],
    )
