"""Greedy decoding the way people deploy it: a static KV cache and one compiled, CUDA-graph
captured decode step (gpt-fast's loop over transformers models), with the same loop uncompiled
as the eager reference.

Why our own loop rather than ``generate(cache_implementation="static")``: generate's per-step
Python (logits processors, stopping criteria, cache bookkeeping) costs milliseconds a token,
more than an 8B model's 4-bit weights take to read on an H100, so it would hide the kernels.
The loop works for any transformers causal LM and for a VLM's language model (InternVL): the
prefill may carry extra inputs (pixel values), the decode steps carry one token each.
Grouped-query models attend without expanding their KV cache (``qpipe.evaluation.attention``);
with ``QPIPE_FUSED_NORM=1`` the decoder layers add and normalize in one kernel
(``qpipe.evaluation.fused_norm``, opt-in until measured).
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qpipe.errors import ConfigError
from qpipe.evaluation.attention import grouped_attention
from qpipe.evaluation.fused_norm import fused_norm

DECODE_MODES = ("eager", "compiled", "both")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _static_cache(model: Any, max_cache_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def _takes(model: Any, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


@dataclass
class DecodeTiming:
    """One measured configuration; tokens are the greedy continuation of the first sequence."""

    mode: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_ms_per_token: float
    compile_s: float = 0.0
    tokens: list[int] = field(default_factory=list)
    # the same decoder fed a reference continuation (``measure(reference=...)``): its greedy
    # choice at every step of that history, and whether every batch row decoded like row 0
    forced: list[int] = field(default_factory=list)
    rows_identical: bool = True
    # whether the decoder layers ran on the fused add + RMSNorm kernel (QPIPE_FUSED_NORM=1)
    fused_norm: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class StaticDecoder:
    """Prefill once, then one token per step into a static KV cache.

    ``compiled=True`` wraps the step in ``torch.compile(mode="reduce-overhead",
    fullgraph=True)``: Inductor fuses the glue around the matmuls and a CUDA graph replays the
    whole step, so a token costs one graph launch instead of hundreds of kernel launches.
    """

    def __init__(
        self, model: Any, max_cache_len: int, *, compiled: bool, backend: str = "inductor"
    ) -> None:
        self.model = model
        self.cache = _static_cache(model, max_cache_len)
        self.compiled = compiled
        self._keep_one = _takes(model, "logits_to_keep")
        # reduce-overhead = CUDA graphs; other backends (tests) take no mode.
        mode = "reduce-overhead" if backend == "inductor" else None
        self._step = (
            torch.compile(self._decode_step, backend=backend, mode=mode, fullgraph=True)
            if compiled
            else self._decode_step
        )

    def _decode_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        logits = self.model(
            input_ids=token,
            cache_position=position,
            past_key_values=self.cache,
            use_cache=True,
        ).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def prefill(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the prompt (``input_ids`` plus any extra model inputs); the first new token."""
        self.cache.reset()
        length = inputs["input_ids"].shape[1]
        extra = {"logits_to_keep": 1} if self._keep_one else {}
        position = torch.arange(length, device=inputs["input_ids"].device)
        logits = self.model(
            **inputs, cache_position=position, past_key_values=self.cache, use_cache=True, **extra
        ).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # A CUDA-graph replay reuses its output buffer: clone what must outlive the next step.
        return self._step(token, position).clone()

    def forced(self, inputs: dict[str, torch.Tensor], reference: list[int]) -> list[int]:
        """Row 0's greedy choice at each of ``len(reference)`` steps when every step is fed
        the reference's token instead of its own: prefill, then ``step(reference[i])``. A
        free-running comparison stops meaning anything after the first near-tie (the two
        sequences no longer share a history); this one checks every step on the same one."""
        batch, start = inputs["input_ids"].shape
        first = self.prefill(inputs)
        picks = [int(first[0, 0])]
        fed = torch.tensor(reference[:-1], device=first.device, dtype=first.dtype)
        position = torch.tensor([start], device=first.device, dtype=torch.long)
        for token in fed:
            picks.append(int(self.step(token.expand(batch, 1).contiguous(), position)[0, 0]))
            position += 1
        return picks

    def continue_from(self, token: torch.Tensor, start: int, count: int) -> list[torch.Tensor]:
        position = torch.tensor([start], device=token.device, dtype=torch.long)
        out = []
        for _ in range(count):
            token = self.step(token, position)
            out.append(token)
            position += 1
        return out


def warm_up(decoder: StaticDecoder, inputs: dict[str, torch.Tensor], steps: int = 3) -> float:
    """Seconds spent on first calls: kernel autotuning (eager, before any capture), then
    compilation and CUDA-graph recording. Afterwards a replay never tunes, syncs or allocates."""
    device = inputs["input_ids"].device
    _sync(device)
    start = time.perf_counter()
    first = decoder.prefill(inputs)
    if decoder.compiled:
        # Tune every kernel for this batch eagerly first: the captured graph must only replay.
        decoder._decode_step(first, torch.tensor([inputs["input_ids"].shape[1]], device=device))
        decoder.prefill(inputs)
    decoder.continue_from(first, inputs["input_ids"].shape[1], steps)
    _sync(device)
    return time.perf_counter() - start


def measure(
    model: Any,
    inputs: dict[str, torch.Tensor],
    new_tokens: int,
    *,
    compiled: bool,
    repeats: int = 3,
    backend: str = "inductor",
    reference: list[int] | None = None,
) -> DecodeTiming:
    """TTFT (prefill + first token) and decode tokens/s, medians over ``repeats`` after a
    warm-up, for greedy decoding of ``new_tokens`` tokens. ``reference``: a continuation to
    check the same decoder (the same compiled graph) against, step by step (``forced``)."""
    ids = inputs["input_ids"]
    batch, length = ids.shape
    device = ids.device
    decoder = StaticDecoder(model, length + new_tokens + 1, compiled=compiled, backend=backend)
    with torch.inference_mode(), grouped_attention(model), fused_norm(model) as fused:
        compile_s = warm_up(decoder, inputs)
        ttfts, decodes = [], []
        tokens: list[torch.Tensor] = []
        for _ in range(max(1, repeats)):
            _sync(device)
            t0 = time.perf_counter()
            first = decoder.prefill(inputs)
            _sync(device)
            t1 = time.perf_counter()
            rest = decoder.continue_from(first, length, new_tokens - 1)
            _sync(device)
            t2 = time.perf_counter()
            ttfts.append(t1 - t0)
            decodes.append(t2 - t1)
            tokens = [first, *rest]
        forced = decoder.forced(inputs, reference) if reference else []
    sequences = torch.cat(tokens, dim=1)
    ttft = statistics.median(ttfts)
    decode = max(statistics.median(decodes), 1e-9)
    steps = max(new_tokens - 1, 1)
    return DecodeTiming(
        mode="compiled" if compiled else "eager",
        batch=batch,
        prompt_tokens=length,
        new_tokens=new_tokens,
        ttft_ms=ttft * 1e3,
        prefill_tok_s=batch * length / ttft,
        decode_tok_s=batch * steps / decode,
        decode_ms_per_token=decode / steps * 1e3,
        compile_s=compile_s if compiled else 0.0,
        tokens=sequences[0].tolist(),
        forced=forced,
        rows_identical=bool((sequences == sequences[:1]).all()),
        fused_norm=fused,
    )


def reference_continuation(
    model: Any, inputs: dict[str, torch.Tensor], new_tokens: int
) -> tuple[list[int], list[float]]:
    """transformers' own greedy ``generate`` (dynamic cache, its attention): row 0's tokens and,
    at each step, the gap between its top two logits (0.0: an exact tie at the logits'
    precision, where any other correct computation may pick the other token)."""
    ids = inputs["input_ids"]
    inputs = {"attention_mask": torch.ones_like(ids), **inputs}
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    gaps = []
    for step in out.logits:
        top2 = step[0].float().topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    return tokens, gaps


@dataclass
class Agreement:
    """One decode path's greedy tokens against a reference continuation."""

    positions: int
    free_running: int  # equal tokens position by position, each path on its own history
    first_divergence: int | None  # the first position where they differ (None: never)
    gap_at_divergence: float | None  # the reference's top-2 logit gap there (0.0 = a tie)
    forced: int  # equal tokens with the path fed the reference's history (no cascade)
    forced_misses: list[int]  # positions where even the forced choice differs
    forced_miss_gaps: list[float]  # the reference's top-2 gap at each of them

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def agreement(timing: DecodeTiming, reference: list[int], gaps: list[float]) -> Agreement:
    n = min(len(reference), len(timing.tokens))
    same = [a == b for a, b in zip(timing.tokens[:n], reference[:n], strict=True)]
    first = same.index(False) if False in same else None
    forced = timing.forced[:n]
    misses = [i for i, (a, b) in enumerate(zip(forced, reference, strict=False)) if a != b]
    return Agreement(
        positions=n,
        free_running=sum(same),
        first_divergence=first,
        gap_at_divergence=gaps[first] if first is not None and first < len(gaps) else None,
        forced=len(forced) - len(misses),
        forced_misses=misses,
        forced_miss_gaps=[gaps[i] for i in misses if i < len(gaps)],
    )


def modes_for(setting: str, device: str) -> list[str]:
    """``eval.decode`` -> the modes to run: compiled decoding needs CUDA graphs, so a CPU run
    asked for ``both`` measures eager only (compiled on CPU was asked for explicitly)."""
    if setting not in DECODE_MODES:
        raise ConfigError(
            f"eval.decode={setting!r} is not valid; use one of: {', '.join(DECODE_MODES)}"
        )
    if setting == "both":
        # eager first: it then runs in a process no compiled graph has touched yet
        return ["eager", "compiled"] if device.startswith("cuda") else ["eager"]
    return [setting]
