"""Quality of a causal LM against its unquantized self: perplexity on several eval domains,
agreement of the next-token distributions (KL, top-1) and of greedy continuations (BLEU).

The baseline stage runs ``measure(..., keep_top_k=k)`` on the unquantized model and caches the
top-k log-probs of every eval token (not the logits: SmolLM2's 4096 tokens x 49152 vocab would
be 0.8 GB of fp32 per domain; the top 32 are 1 MB) and its greedy continuations of the prompts.
The benchmark stage runs ``measure(..., reference=...)`` on the quantized model and scores it
against them, with the same token windows, so every number compares like with like.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qpipe.console.progress import steps
from qpipe.corpora.texts import read_text, token_ids
from qpipe.errors import ConfigError
from qpipe.models.source import source_kind

_NAME = re.compile(r"^[A-Za-z0-9_]+$")


NOISE = (
    "model.weights=random: perplexity and agreement would measure noise "
    "(eval.quality_on_random=true measures them anyway)"
)


def noise_only(cfg: Any) -> bool:
    """Quality of random weights is noise: the baseline and perplexity run only when asked."""
    return source_kind(cfg.model) == "random" and not cfg.eval.get("quality_on_random", False)


def eval_domains(ev: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, text) of every eval domain: ``eval.text`` first (named ``eval.name``), then
    ``eval.extra_texts`` in order. Names become metric suffixes (``quality.ppl.<name>``)."""
    domains = [(str(ev.get("name") or "main"), str(ev["text"]))]
    domains += [(str(k), str(v)) for k, v in (ev.get("extra_texts") or {}).items()]
    names = [n for n, _ in domains]
    for name in names:
        if not _NAME.match(name):
            raise ConfigError(
                f"eval domain name {name!r} is not valid; use letters, digits and underscores"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"eval domain names repeat ({', '.join(names)}); give each its own")
    return domains


def validate_eval_texts(ev: Mapping[str, Any]) -> None:
    """One-line ConfigError for a missing eval text or bad domain name (before heavy work)."""
    for index, (name, text) in enumerate(eval_domains(ev)):
        read_text(text, "eval.text" if index == 0 else f"eval.extra_texts.{name}")
    if int(ev.get("top_k", 32)) < 1:
        raise ConfigError(f"eval.top_k={ev.get('top_k')} must be ≥ 1")


@dataclass
class Score:
    """One eval text scored by one model.

    nll_sum / tokens: for perplexity. top_logprobs / top_ids: the model's k most likely next
    tokens at every position (kept for the baseline). kld_sum / top1_hits: agreement with a
    reference (summed over tokens; divide by ``tokens``)."""

    nll_sum: float = 0.0
    tokens: int = 0
    top_logprobs: list[torch.Tensor] = field(default_factory=list)
    top_ids: list[torch.Tensor] = field(default_factory=list)
    kld_sum: float = 0.0
    top1_hits: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    def reference(self) -> dict[str, torch.Tensor]:
        return {"logprobs": torch.cat(self.top_logprobs), "ids": torch.cat(self.top_ids)}


def topk_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, ref_ids: torch.Tensor
) -> torch.Tensor:
    """KL(reference || model) per position, over the reference's top-k tokens plus one bucket
    for the rest of the vocabulary. This is the exact KL of the two distributions coarsened to
    k + 1 outcomes: never above the full KL, and equal to it as the tail mass goes to 0.

    logprobs: [T, V] the model's log-softmax; ref_logprobs / ref_ids: [T, k]."""
    q_top = logprobs.gather(1, ref_ids.long())
    p_top = ref_logprobs.exp()
    head = (p_top * (ref_logprobs - q_top)).sum(-1)
    p_tail = (1 - p_top.sum(-1)).clamp_min(0)
    q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-12).log() - q_tail.log()), 0)
    return head + tail


def measure(
    model,
    ids: torch.Tensor,
    window: int,
    device: str,
    *,
    keep_top_k: int = 0,
    reference: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Score:
    """Score ``ids`` in non-overlapping windows of ``window`` tokens (each window from its own
    start, as ``qpipe.evaluation.harness.perplexity``): perplexity, and optionally the top-k log-probs
    (``keep_top_k``) and agreement with a reference made the same way (``reference``).
    ``progress(done)`` is called after each window."""
    score = Score()
    with torch.inference_mode():
        for done, start in enumerate(range(0, ids.numel() - 1, window), 1):
            chunk = ids[start : start + window].unsqueeze(0).to(device)
            if chunk.numel() < 2:
                break
            # Everything stays on the device; only k values a token come back (a [T, vocab]
            # copy to the host would cost more than the forward pass on a GPU).
            logprobs = F.log_softmax(model(input_ids=chunk).logits[0, :-1].float(), dim=-1)
            targets = chunk[0, 1:]
            n = targets.numel()
            score.nll_sum -= logprobs.gather(1, targets[:, None]).sum().item()
            if keep_top_k:
                top = logprobs.topk(keep_top_k, dim=-1)
                score.top_logprobs.append(top.values.cpu())
                score.top_ids.append(top.indices.to(torch.int32).cpu())
            if reference is not None:
                ref_lp = reference["logprobs"][score.tokens : score.tokens + n].to(device)
                ref_ids = reference["ids"][score.tokens : score.tokens + n].to(device)
                if ref_lp.shape[0] != n:
                    raise ValueError(
                        f"the baseline reference holds {reference['ids'].shape[0]} tokens, fewer "
                        "than this eval text: it was made with other eval settings"
                    )
                score.kld_sum += topk_kl(logprobs, ref_lp, ref_ids).sum().item()
                score.top1_hits += int((logprobs.argmax(-1) == ref_ids[:, 0].long()).sum())
            score.tokens += n
            if progress is not None:
                progress(done)
    return score


def _windows(ids: torch.Tensor, window: int) -> int:
    return len(range(0, ids.numel() - 1, window))


def continuations(
    model, tokenizer, prompts: Sequence[str], new_tokens: int, device: str
) -> list[str]:
    """Greedy continuations of ``prompts``, generated as one left-padded batch (one decode
    loop for all prompts: on slow CPU kernels that is the difference between seconds and
    minutes). Baseline and quantized model go through the same call, so padding is alike."""
    if not prompts:
        return []
    encoded = [tokenizer(p).input_ids for p in prompts]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenization) of ``hypotheses`` against one
    reference each: 100 for identical text."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def baseline_quality(model, tokenizer, ev: Mapping[str, Any], device: str, workdir: Path) -> dict:
    """What the benchmark needs from the unquantized model: per-domain perplexity, the top-k
    log-probs of every eval token (saved beside, priced), the prompts' continuations."""
    top_k = int(ev.get("top_k", 32))
    ppl: dict[str, float] = {}
    reference: dict[str, dict[str, torch.Tensor]] = {}
    full_bytes = 0
    for name, text in eval_domains(ev):
        ids = token_ids(tokenizer, read_text(text), int(ev.max_tokens))
        tick = steps(f"baseline: perplexity on {name}, windows", _windows(ids, int(ev.window)))
        score = measure(model, ids, int(ev.window), device, keep_top_k=top_k, progress=tick)
        ppl[name] = score.ppl
        reference[name] = score.reference()
        full_bytes += score.tokens * model.config.get_text_config().vocab_size * 4
    path = workdir / "baseline_topk.pt"
    torch.save(reference, path)
    prompts = list(ev.get("prompts") or [])
    return {
        "ppl_by_domain": ppl,
        "reference": str(path),
        "reference_mb": path.stat().st_size / 1e6,
        "full_logits_mb": full_bytes / 1e6,
        "prompts": prompts,
        "continuations": continuations(model, tokenizer, prompts, int(ev.max_new_tokens), device),
    }


def quality_metrics(
    model, tokenizer, ev: Mapping[str, Any], device: str, baseline: Mapping[str, Any]
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of the model under test: ``quality.ppl[.<name>]`` and, where the baseline ran,
    ``quality.ppl_delta_pct[.<name>]``, ``quality.kld[.<name>]``,
    ``quality.top1_agree[.<name>]`` and ``quality.bleu_vs_baseline``. Also the outputs
    (per-domain perplexity, the continuations)."""
    ref_path = baseline.get("reference")
    reference = torch.load(ref_path) if ref_path else None
    base_ppl = baseline.get("ppl_by_domain") or {}
    metrics: dict[str, float] = {}
    outputs: dict[str, Any] = {"ppl_by_domain": {}}
    kld_sum, hits, tokens = 0.0, 0, 0
    for i, (name, text) in enumerate(eval_domains(ev)):
        ids = token_ids(tokenizer, read_text(text), int(ev.max_tokens))
        ref = reference.get(name) if reference else None
        tick = steps(f"perplexity on {name}, windows", _windows(ids, int(ev.window)))
        score = measure(model, ids, int(ev.window), device, reference=ref, progress=tick)
        outputs["ppl_by_domain"][name] = score.ppl
        suffixes = ["", f".{name}"] if i == 0 else [f".{name}"]
        for s in suffixes:
            metrics[f"quality.ppl{s}"] = score.ppl
            if name in base_ppl:
                delta = (score.ppl - base_ppl[name]) / base_ppl[name] * 100
                metrics[f"quality.ppl_delta_pct{s}"] = delta
        if ref is not None:
            metrics[f"quality.kld.{name}"] = score.kld_sum / score.tokens
            metrics[f"quality.top1_agree.{name}"] = score.top1_hits / score.tokens
            kld_sum, hits, tokens = (
                kld_sum + score.kld_sum,
                hits + score.top1_hits,
                tokens + score.tokens,
            )
    if tokens:
        metrics["quality.kld"] = kld_sum / tokens
        metrics["quality.top1_agree"] = hits / tokens
    refs = baseline.get("continuations")
    if refs:
        hyps = continuations(model, tokenizer, baseline["prompts"], int(ev.max_new_tokens), device)
        metrics["quality.bleu_vs_baseline"] = bleu(hyps, refs)
        outputs["continuations"] = hyps
    return metrics, outputs
