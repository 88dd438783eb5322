"""Measured sensitivity: how much quantizing one Linear layer alone changes the model's output.

For each layer, its weight is replaced by its round-to-nearest fake-quantized copy (grouped
min/max, the scheme RTN/GPTQ checkpoints use), the model runs on a few hundred calibration
tokens, and the KL divergence of the next-token distribution from the unquantized model's is
averaged over the tokens; the weight is then restored. Two things keep it cheap:

- the calibration windows run as one batch;
- blocks before the layer's own block are not recomputed: their outputs are the unquantized
  model's (cached once), so a layer in block i costs a forward of blocks i..N only.

The 8-bit loss is predicted, not measured: for a small weight error the KL grows with the
error's square, so ``kl_8 = kl_4 * |W - Q8(W)|^2 / |W - Q4(W)|^2`` with both norms computed
from the layer's own weights (``noise_ratio``). No weights: ``prior_sensitivity`` stands in.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from qpipe.corpora.calibration import token_windows
from qpipe.kernels.intweights import quantize_rtn
from qpipe.memory.inventory import Inventory

log = logging.getLogger("qpipe")

_PRIOR_HEAVY = ("v_proj", "down_proj", "w2", "fc2", "wv")
_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def fake_quantize(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> torch.Tensor:
    """The weight after RTN quantization and dequantization (same dtype and shape)."""
    gs = group_size if group_size > 0 else weight.shape[1]
    iw = quantize_rtn(weight, group_size=gs, bits=bits, symmetric=symmetric)
    return iw.dequantize(weight.dtype)


def noise_ratio(weight: torch.Tensor, group_size: int, symmetric: bool, hi: int = 8) -> float:
    """|W - Q_hi(W)|^2 / |W - Q_4(W)|^2: how much smaller the hi-bit rounding error is."""
    w = weight.float()
    e4 = (w - fake_quantize(w, 4, group_size, symmetric)).pow(2).sum().item()
    eh = (w - fake_quantize(w, hi, group_size, symmetric)).pow(2).sum().item()
    return eh / e4 if e4 > 0 else 0.0


def calibration_batch(
    tokenizer: Any, texts: Iterable[str], samples: int, seq_len: int
) -> torch.Tensor:
    """[samples, seq_len] token ids: windows spread over the calibration texts."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = [w for w in token_windows(ids, samples, seq_len) if len(w) == seq_len]
    if not windows:
        raise ValueError(f"the calibration text holds fewer than seq_len={seq_len} tokens")
    return torch.tensor(windows, dtype=torch.long)


def _blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The ModuleList of repeated blocks that holds the most Linear layers (decoder layers)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            count = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    return best


def _block_index(layer: str, blocks_name: str) -> int | None:
    if not blocks_name or not layer.startswith(blocks_name + "."):
        return None
    head = layer[len(blocks_name) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@contextmanager
def _replay_blocks(blocks: torch.nn.ModuleList, outputs: Sequence[Any], upto: int):
    """Blocks ``0..upto-1`` return their cached unquantized outputs instead of computing."""
    for i in range(upto):
        blocks[i].forward = (lambda out: lambda *a, **k: out)(outputs[i])
    try:
        yield
    finally:
        for i in range(upto):
            del blocks[i].forward


def _kl_and_nll(
    logits: torch.Tensor, ref_logp: torch.Tensor, ids: torch.Tensor
) -> tuple[float, float]:
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
    nll = F.nll_loss(logp[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    return kl, nll


@torch.no_grad()
def measure_sensitivity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    layers: Sequence[str],
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """{layer: {kl, nll_delta, noise_ratio_8, numel}}: the mean per-token KL divergence (nats)
    of the model's next-token distribution with only that layer at ``bits``, from the
    unquantized model's, on ``ids`` ([batch, seq])."""
    model.eval()
    device = next(model.parameters()).device
    ids = ids.to(device)
    found = _blocks(model)
    blocks_name, blocks = found if found else ("", torch.nn.ModuleList())
    cached: list[Any] = [None] * len(blocks)
    hooks = [
        b.register_forward_hook(lambda _m, _a, out, i=i: cached.__setitem__(i, out))
        for i, b in enumerate(blocks)
    ]
    try:
        ref_logits = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    ref_nll = F.nll_loss(ref_logp[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    replayable = all(c is not None for c in cached)
    modules = dict(model.named_modules())
    out: dict[str, dict[str, float]] = {}
    for n, name in enumerate(layers):
        linear = modules[name]
        original = linear.weight.data
        linear.weight.data = fake_quantize(original, bits, group_size, symmetric)
        idx = _block_index(name, blocks_name) if replayable else None
        try:
            with _replay_blocks(blocks, cached, idx or 0):
                logits = model(input_ids=ids).logits
        finally:
            linear.weight.data = original
        kl, nll = _kl_and_nll(logits, ref_logp, ids)
        out[name] = {
            "kl": max(kl, 0.0),
            "nll_delta": nll - ref_nll,
            "noise_ratio_8": noise_ratio(original, group_size, symmetric),
            "numel": float(original.numel()),
        }
        if progress:
            progress(n + 1, len(layers))
    return out


def log_progress(every: int = 20) -> Callable[[int, int], None]:
    """A progress callback that logs every ``every`` layers with the elapsed time."""
    start = time.perf_counter()

    def report(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            log.info("sensitivity: %d/%d layers (%.0f s)", done, total, time.perf_counter() - start)

    return report


def prior_sensitivity(inventory: Inventory, layers: Sequence[str]) -> dict[str, dict[str, float]]:
    """What stands in for a measurement when there are no weights (``pipeline=estimate``,
    random weights): the loss of rounding a layer grows with its parameter count; the first
    and last block of a stack, and the value and MLP-down projections (the tensors llama.cpp's
    k-quant mixes give more bits), count double. Same keys as ``measure_sensitivity``, the
    noise ratio of ideal uniform rounding."""
    shapes = {m.name: m.weight_shape for m in inventory.linears()}
    index: dict[str, tuple[str, int]] = {}
    for name in layers:
        m = _BLOCK.match(name)
        if m:
            index[name] = (m["prefix"], int(m["index"]))
    last = {}
    for prefix, i in index.values():
        last[prefix] = max(last.get(prefix, 0), i)
    out = {}
    for name in layers:
        numel = float(shapes[name][0] * shapes[name][1])
        edge = name in index and index[name][1] in (0, last[index[name][0]])
        leaf = name.rsplit(".", 1)[-1]
        weight = (2.0 if edge else 1.0) * (2.0 if leaf in _PRIOR_HEAVY else 1.0)
        out[name] = {
            "kl": numel * weight * 1e-12,
            "nll_delta": 0.0,
            "noise_ratio_8": (15 / 255) ** 2,
            "numel": numel,
        }
    return out


def ranking(table: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Layer names, most sensitive first (ties: by name, for a stable order)."""
    return sorted(table, key=lambda n: (-float(table[n]["kl"]), n))
