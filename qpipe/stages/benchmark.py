"""benchmark: quality (perplexity, or embedding agreement for encoders), prefill latency
(TTFT), decode tokens/s at several batch sizes, and a greedy sample logged as text."""

from __future__ import annotations

import torch

from qpipe import decode
from qpipe.config import decode_batch_sizes
from qpipe.evaluate import eval_sentences, greedy_sample, perplexity, sentence_embeddings
from qpipe.stages.base import StageContext, StageResult
from qpipe.textdata import read_text, token_ids


def _encoder(ctx: StageContext, model, tokenizer, device: str, text: str) -> StageResult:
    emb = sentence_embeddings(model, tokenizer, eval_sentences(text), device)
    metrics: dict[str, float] = {}
    reference = ctx.output("baseline", "embeddings")
    if reference:
        cos = (emb * torch.load(reference)).sum(-1)
        metrics["quality.embed_cosine_mean"] = cos.mean().item()
        metrics["quality.embed_cosine_min"] = cos.min().item()
    return StageResult(outputs={"sentences": emb.shape[0]}, metrics=metrics)


def _decode_speeds(cfg, model, tokenizer, text: str, device: str) -> tuple[dict, dict]:
    """Greedy decoding at every batch size, compiled and/or eager (``eval.decode``).
    ``perf.decode_tok_s`` is the compiled number where compiled decoding ran: what users
    deploy; the eager one stays beside it as ``perf.decode_tok_s_eager``."""
    ev = cfg.eval
    modes = decode.modes_for(str(ev.decode), device)
    ids = token_ids(tokenizer, text, int(ev.prefill_tokens)).to(device)
    speeds: dict[str, dict[int, dict]] = {mode: {} for mode in modes}
    metrics: dict[str, float] = {}
    for mode in modes:
        suffix = "" if mode == modes[0] else f"_{mode}"
        for batch in decode_batch_sizes(cfg, device):
            timing = decode.measure(
                model,
                {"input_ids": ids.unsqueeze(0).repeat(batch, 1)},
                int(ev.max_new_tokens),
                compiled=mode == "compiled",
                repeats=int(ev.repeats),
            )
            speeds[mode][batch] = timing.as_dict()
            metrics[f"perf.decode_tok_s{suffix}.b{batch}"] = timing.decode_tok_s
            if batch == decode_batch_sizes(cfg, device)[0]:
                metrics[f"perf.decode_tok_s{suffix}"] = timing.decode_tok_s
                if mode == modes[0]:
                    metrics["perf.ttft_ms"] = timing.ttft_ms
                    metrics["perf.prefill_tok_s"] = timing.prefill_tok_s
        if mode == "compiled":
            metrics["time.compile_s"] = sum(t["compile_s"] for t in speeds[mode].values())
    if "eager" in modes:
        metrics.setdefault("perf.decode_tok_s_eager", metrics["perf.decode_tok_s"])
    if len(modes) == 2:
        first = decode_batch_sizes(cfg, device)[0]
        a, b = (speeds[m][first]["tokens"] for m in modes)
        metrics["perf.compiled_eager_token_agree"] = sum(
            x == y for x, y in zip(a, b, strict=True)
        ) / len(a)
    return speeds, metrics


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    ev = cfg.eval
    model = ctx.obj("load", "model")
    tokenizer = ctx.obj("load", "tokenizer")
    device = ctx.output("load", "device")
    text = read_text(ev.text)
    if cfg.model.get("task", "causal-lm") == "feature-extraction":
        return _encoder(ctx, model, tokenizer, device, text)

    ppl = perplexity(model, token_ids(tokenizer, text, int(ev.max_tokens)), int(ev.window), device)
    metrics = {"quality.ppl": ppl}
    baseline = ctx.output("baseline", "ppl")
    if baseline:
        metrics["quality.ppl_delta_pct"] = (ppl - baseline) / baseline * 100

    speeds, decode_metrics = _decode_speeds(cfg, model, tokenizer, text, device)
    metrics.update(decode_metrics)
    sample = greedy_sample(model, tokenizer, ev.prompt, int(ev.max_new_tokens), device)
    path = ctx.workdir / "sample.txt"
    path.write_text(f"{ev.prompt}{sample}\n")
    return StageResult(
        outputs={"ppl": ppl, "speeds": speeds, "prompt": ev.prompt, "sample": sample},
        metrics=metrics,
        artifacts=[path],
    )
