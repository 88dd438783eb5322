"""baseline: the unquantized model's quality on the eval texts, for quality.ppl_delta_pct and
the agreement metrics (top-k log-probs of every eval token, greedy continuations of the prompts).

Cached by the runner per model / eval / dtype / device, so a sweep pays for it once. Skipped,
with the reason, when the unquantized model would not fit (the budget's estimate says so).
"""

from __future__ import annotations

import gc
import logging

import torch

from qpipe.backends.none import load_hf
from qpipe.corpora.texts import read_text
from qpipe.evaluation.harness import eval_sentences, sentence_embeddings
from qpipe.evaluation.quality import NOISE, baseline_quality, noise_only
from qpipe.models import load_tokenizer, materialize
from qpipe.stages.base import StageContext, StageResult

log = logging.getLogger("qpipe")


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    if not cfg.eval.baseline:
        return StageResult(outputs={"skipped": "eval.baseline=false"})
    if noise_only(cfg):
        log.info("baseline skipped: %s", NOISE)
        return StageResult(outputs={"skipped": NOISE}, cacheable=False)
    fp_total = ctx.output("memory_budget", "options", {}).get("none")
    usable = ctx.output("memory_budget", "usable_gb")
    if fp_total is not None and usable is not None and fp_total > usable:
        return StageResult(
            outputs={"skipped": f"unquantized model needs {fp_total:.2f} GB > {usable:.2f} GB"}
        )
    settings = ctx.settings
    device = settings.device
    model = load_hf(materialize(cfg.model), settings.model_class, device, settings.dtype)
    tokenizer = load_tokenizer(cfg.model)
    text = read_text(cfg.eval.text)
    outputs: dict = {}
    metrics: dict = {}
    if settings.task == "feature-extraction":
        emb = sentence_embeddings(model, tokenizer, eval_sentences(text), device)
        path = ctx.workdir / "baseline_embeddings.pt"
        torch.save(emb, path)
        outputs["embeddings"] = str(path)
    else:
        quality = baseline_quality(model, tokenizer, cfg.eval, device, ctx.workdir)
        ppl = quality["ppl_by_domain"]
        outputs.update(quality, ppl=next(iter(ppl.values())))
        metrics["quality.baseline_ppl"] = outputs["ppl"]
        metrics.update({f"quality.baseline_ppl.{name}": p for name, p in ppl.items()})
        metrics["quality.reference_mb"] = quality["reference_mb"]
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return StageResult(outputs=outputs, metrics=metrics)
