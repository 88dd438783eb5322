"""benchmark: quality (perplexity, or embedding agreement for encoders), prefill latency
(TTFT), decode tokens/s at several batch sizes, and a greedy sample logged as text."""

from __future__ import annotations

import json
import logging

import torch

from qpipe.config.compose import decode_batch_sizes
from qpipe.corpora.texts import read_text, token_ids
from qpipe.evaluation import decode
from qpipe.evaluation.harness import eval_sentences, greedy_sample, sentence_embeddings
from qpipe.evaluation.quality import NOISE, noise_only, quality_metrics
from qpipe.evaluation.vision import benchmark_with_image
from qpipe.models.source import source_kind
from qpipe.stages._warmup import Snapshot, cache_metrics, warmup_key
from qpipe.stages.base import StageContext, StageResult

log = logging.getLogger("qpipe")


def _encoder(ctx: StageContext, model, tokenizer, device: str, text: str) -> StageResult:
    emb = sentence_embeddings(model, tokenizer, eval_sentences(text), device)
    metrics: dict[str, float] = {}
    reference = ctx.output("baseline", "embeddings")
    if reference:
        cos = (emb * torch.load(reference)).sum(-1)
        metrics["quality.embed_cosine_mean"] = cos.mean().item()
        metrics["quality.embed_cosine_min"] = cos.min().item()
    return StageResult(outputs={"sentences": emb.shape[0]}, metrics=metrics)


def _decode_speeds(cfg, model, tokenizer, text: str, device: str) -> tuple[dict, dict, dict]:
    """Greedy decoding at every batch size, compiled and/or eager (``eval.decode``), each path
    checked against transformers' own ``generate`` on the same prompt. ``perf.decode_tok_s``
    is the compiled number where compiled decoding ran: what users deploy; the eager one stays
    beside it as ``perf.decode_tok_s_eager``."""
    ev = cfg.eval
    batches = decode_batch_sizes(cfg, device)
    ids = token_ids(tokenizer, text, int(ev.prefill_tokens)).to(device)
    modes = decode.modes_for(str(ev.decode), device)
    new_tokens = int(ev.max_new_tokens)
    speeds: dict[str, dict[int, dict]] = {}
    metrics: dict[str, float] = {}
    references = {
        b: decode.reference_continuation(
            model, {"input_ids": ids.unsqueeze(0).repeat(b, 1)}, new_tokens
        )
        for b in batches
    }
    for mode in modes:
        log.info(
            "decode timing: %s, batch %s, %d × %d new tokens",
            mode,
            "/".join(str(b) for b in batches),
            int(ev.repeats),
            int(ev.max_new_tokens),
        )
        try:
            speeds[mode] = {
                b: decode.measure(
                    model,
                    {"input_ids": ids.unsqueeze(0).repeat(b, 1)},
                    new_tokens,
                    compiled=mode == "compiled",
                    repeats=int(ev.repeats),
                    reference=references[b][0],
                ).as_dict()
                for b in batches
            }
        except Exception as err:
            if mode != "compiled":
                raise
            # Compiling is an optimisation: a model Dynamo cannot trace is still measured eager,
            # and the run says why its compiled number is missing.
            log.warning("compiled decoding failed, measuring eager only: %s", _first_line(err))
            metrics["perf.compile_failed"] = 1.0
            if "eager" not in modes:
                modes.append("eager")
    primary = "compiled" if "compiled" in speeds else "eager"
    for mode, by_batch in speeds.items():
        suffix = "" if mode == primary else f"_{mode}"
        for b, timing in by_batch.items():
            metrics[f"perf.decode_tok_s{suffix}.b{b}"] = timing["decode_tok_s"]
        metrics[f"perf.decode_tok_s{suffix}"] = by_batch[batches[0]]["decode_tok_s"]
    first = speeds[primary][batches[0]]
    metrics["perf.ttft_ms"] = first["ttft_ms"]
    metrics["perf.prefill_tok_s"] = first["prefill_tok_s"]
    if "eager" in speeds:
        metrics["perf.decode_tok_s_eager"] = speeds["eager"][batches[0]]["decode_tok_s"]
    if "compiled" in speeds:
        metrics["time.compile_s"] = sum(t["compile_s"] for t in speeds["compiled"].values())
    checks = _agreement(cfg, speeds, references, batches)
    metrics.update(checks.pop("metrics"))
    return speeds, metrics, checks


def _agreement(cfg, speeds: dict, references: dict, batches: list[int]) -> dict:
    """Each path's greedy tokens against ``generate``'s. Stepped on generate's own history
    (``forced``) on every model; free-running (each path on its own history) only on real
    weights: a random model's logits are near-ties everywhere, so its free-running sequences
    part at the first one and the number would read as a failure that is not one."""
    real = source_kind(cfg.model) != "random"
    metrics: dict[str, float] = {}
    by_batch: dict[str, dict] = {}
    for b in batches:
        tokens, gaps = references[b]
        by_batch[str(b)] = {"generate": tokens, "generate_top2_gaps": gaps}
        suffix = "" if b == batches[0] else f".b{b}"
        for mode in ("compiled", "eager"):
            if mode not in speeds:
                continue
            timing = speeds[mode][b]
            found = decode.agreement(decode.DecodeTiming(**timing), tokens, gaps)
            by_batch[str(b)][mode] = {**found.as_dict(), "rows_identical": timing["rows_identical"]}
            metrics[f"perf.{mode}_generate_forced_agree{suffix}"] = found.forced / found.positions
            if real:
                metrics[f"perf.{mode}_generate_token_agree{suffix}"] = (
                    found.free_running / found.positions
                )
        if real and {"compiled", "eager"} <= speeds.keys() and b == batches[0]:
            a, e = speeds["compiled"][b]["tokens"], speeds["eager"][b]["tokens"]
            same = sum(x == y for x, y in zip(a, e, strict=True))
            metrics["perf.compiled_eager_token_agree"] = same / len(a)
    return {"metrics": metrics, "by_batch": by_batch, "free_running_checked": real}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    ev = cfg.eval
    model = ctx.obj("load", "model")
    tokenizer = ctx.obj("load", "tokenizer")
    device = ctx.output("load", "device")
    text = read_text(ev.text)
    if ctx.settings.task == "feature-extraction":
        return _encoder(ctx, model, tokenizer, device, text)

    baseline = ctx.inputs.get("baseline")
    if noise_only(cfg):
        log.info("quality skipped: %s", NOISE)
        metrics, quality, ppl = {}, {"skipped": NOISE}, None
    else:
        metrics, quality = quality_metrics(
            model, tokenizer, ev, device, baseline.outputs if baseline else {}
        )
        ppl = metrics["quality.ppl"]

    before = Snapshot.now()
    speeds, decode_metrics, checks = _decode_speeds(cfg, model, tokenizer, text, device)
    metrics.update(decode_metrics)
    warmup: dict = {}
    if device.startswith("cuda"):  # compiled decoding and kernel tuning run on GPUs only
        delta = Snapshot.now().since(before)
        tuning_s = delta.tuning_s + float(ctx.output("validate_vram", "kernel_tuning_s") or 0)
        if "validate_vram" in ctx.inputs:  # its tuning is part of this run's warm-up
            delta.tuned += int(ctx.output("validate_vram", "tuned_shapes") or 0)
            delta.from_disk += int(ctx.output("validate_vram", "tuned_shapes_reused") or 0)
        cache, warmup = cache_metrics(
            delta,
            float(decode_metrics.get("time.compile_s", 0.0)),
            tuning_s,
            warmup_key(cfg, ctx.settings, device),
            str(ctx.workdir),
        )
        metrics.update(cache)
    check_path = ctx.workdir / "decode_check.json"
    check_path.write_text(json.dumps(checks, indent=1))
    sample = greedy_sample(model, tokenizer, ev.prompt, int(ev.max_new_tokens), device)
    path = ctx.workdir / "sample.txt"
    path.write_text(f"{ev.prompt}{sample}\n")
    # VLMs: the same with an image in context (qpipe.evaluation.vision); text-only models skip.
    image, image_metrics, image_files = benchmark_with_image(
        model, cfg.model, ev, device, ctx.settings.dtype, ctx.workdir
    )
    metrics.update(image_metrics)
    return StageResult(
        outputs={
            "ppl": ppl,
            "quality": quality,
            "speeds": speeds,
            "prompt": ev.prompt,
            "sample": sample,
            "warmup": warmup,
            **image,
        },
        metrics=metrics,
        artifacts=[path, check_path, *image_files],
    )
