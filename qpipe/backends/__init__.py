"""Quantization backends, one module per library, looked up by ``quant.method``.

Imports are lazy: choosing ``quant=bnb_nf4`` must not import llm-compressor, and a missing
optional library only matters to the method that needs it.
"""

from __future__ import annotations

import importlib

from qpipe.backends.base import Backend, QuantizeRequest, QuantizeResult
from qpipe.errors import ConfigError

_REGISTRY = {
    "none": "qpipe.backends.none:NoQuant",
    "bnb": "qpipe.backends.bnb:BnbBackend",
    "gptq": "qpipe.backends.gptq:GptqBackend",
    "awq": "qpipe.backends.awq:AwqBackend",
    "rtn": "qpipe.backends.rtn:RtnBackend",
    "auto": "qpipe.backends.mixed:MixedBackend",
}

METHODS = tuple(_REGISTRY)


def get_backend(method: str) -> Backend:
    """The backend for ``quant.method``; a clear error naming the valid methods otherwise."""
    if method not in _REGISTRY:
        raise ConfigError(f"quant.method={method!r} is not known; valid: {', '.join(METHODS)}")
    module_name, cls_name = _REGISTRY[method].split(":")
    return getattr(importlib.import_module(module_name), cls_name)()


def option_label(option: str, method: str | None, bits: object) -> str:
    """``gptq-w3``, ``bnb_nf4``, ``none``: the quant option, with the width where its method
    runs at several (a run's name, a point on the Pareto plot)."""
    if method in _REGISTRY and get_backend(method).bits_in_run_name:
        return f"{option}-w{bits}"
    return option


__all__ = [
    "METHODS",
    "Backend",
    "QuantizeRequest",
    "QuantizeResult",
    "get_backend",
    "option_label",
]
