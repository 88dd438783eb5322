"""Decoder layers on qpipe's fused residual-add + RMSNorm kernel (``kernels/add_rms_norm.py``),
opt-in with ``QPIPE_FUSED_NORM=1`` until a GPU measures it (docs/kernels.md).

A Llama/Qwen3 decoder layer is ``h += attn(norm1(h)); h += mlp(norm2(h))``, then the next
layer's ``norm1`` (or the model's final norm) reads the same ``h``. Each add and the norm after
it become one kernel: the add after attention with ``post_attention_layernorm``, the add after
the MLP with the next layer's ``input_layernorm`` (the last layer's with the model's ``norm``).
The layer still returns ``h`` as before; the normalized row it computed for the next one waits
in a small per-model stash that the next layer (or the final norm) takes. Only layer 0 and a
model run that does not start at layer 0 compute a norm on their own.

``fused_norm(model)`` patches the instances for the duration of a ``with`` block (qpipe's decode
loop) and restores them after; models it does not recognize are left as they are.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import types
from collections.abc import Iterator
from typing import Any

import torch

from qpipe.kernels.interpreter import interpreting

ENV = "QPIPE_FUSED_NORM"
_NORMS = ("LlamaRMSNorm", "Qwen3RMSNorm")
_KEY = "normed"


def requested() -> bool:
    """Whether the environment opts the decode step in (``QPIPE_FUSED_NORM=1``)."""
    return os.environ.get(ENV, "0") not in ("", "0")


def reference_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the unpatched layer computes: (norm(residual + x), residual + x)."""
    h = residual + x
    return norm(h), h


def _kernel_takes(x: torch.Tensor, norm: torch.nn.Module) -> bool:
    return (
        (x.is_cuda or _KERNEL["interpreted"])
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and norm.weight.dtype == x.dtype
    )


def _add_norm(
    x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    if _kernel_takes(x, norm):
        return torch.ops.qpipe.add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
    return reference_add_rms_norm(x, residual, norm)


def _layer_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    *,
    _qpipe_stash: dict,
    _qpipe_next_norm: torch.nn.Module,
    _qpipe_first: bool,
    **kwargs: Any,
) -> torch.Tensor:
    # A stashed row belongs to this model run only after layer 0 ran in it.
    normed = None if _qpipe_first else _qpipe_stash.pop(_KEY, None)
    if _qpipe_first:
        _qpipe_stash.clear()
    if normed is None:
        normed = self.input_layernorm(hidden_states)
    attended, _ = self.self_attn(hidden_states=normed, **kwargs)
    normed, hidden_states = _add_norm(attended, hidden_states, self.post_attention_layernorm)
    out = self.mlp(normed)
    normed, hidden_states = _add_norm(out, hidden_states, _qpipe_next_norm)
    _qpipe_stash[_KEY] = normed
    return hidden_states


def _final_norm_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, *, _qpipe_stash: dict, _qpipe_norm: Any
) -> torch.Tensor:
    normed = _qpipe_stash.pop(_KEY, None)
    return _qpipe_norm(hidden_states) if normed is None else normed


def _decoder(model: Any) -> Any:
    """The module holding ``layers`` and the final ``norm`` of a Llama/Qwen3 causal LM."""
    inner = getattr(model, "model", None)
    inner = getattr(inner, "language_model", inner)  # a VLM's text model
    layers = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    if layers is None or norm is None or type(norm).__name__ not in _NORMS:
        return None
    for layer in layers:
        parts = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
        if not all(hasattr(layer, p) for p in parts):
            return None
        if type(layer.input_layernorm).__name__ not in _NORMS:
            return None
        if type(layer.post_attention_layernorm).__name__ not in _NORMS:
            return None
    return inner


# Set outside any compiled region: whether Triton's CPU interpreter runs the kernel (tests).
_KERNEL = {"interpreted": False}


@contextlib.contextmanager
def fused_norm(model: Any, enabled: bool | None = None) -> Iterator[bool]:
    """Within the block, the model's decoder layers add and normalize through the fused kernel
    (``enabled`` None: as ``QPIPE_FUSED_NORM`` says); yields whether it patched."""
    enabled = requested() if enabled is None else enabled
    inner = _decoder(model) if enabled else None
    if inner is None or importlib.util.find_spec("triton") is None:
        yield False
        return
    _KERNEL["interpreted"] = interpreting()
    import qpipe.kernels.ops  # noqa: F401  (registers torch.ops.qpipe.add_rms_norm)

    stash: dict = {}
    layers = list(inner.layers)
    nexts = [layer.input_layernorm for layer in layers[1:]] + [inner.norm]
    patched = [*layers, inner.norm]
    for i, (layer, nxt) in enumerate(zip(layers, nexts, strict=True)):
        forward = types.MethodType(_layer_forward, layer)
        layer.forward = _bind(
            forward, _qpipe_stash=stash, _qpipe_next_norm=nxt, _qpipe_first=i == 0
        )
    norm_forward = types.MethodType(_final_norm_forward, inner.norm)
    inner.norm.forward = _bind(norm_forward, _qpipe_stash=stash, _qpipe_norm=inner.norm.forward)
    try:
        yield True
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def _bind(method: Any, **bound: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs, **bound)

    return forward
