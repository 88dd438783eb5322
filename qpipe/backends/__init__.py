"""Quantization backends, one module per library, looked up by ``quant.method``.

The registry is the quant options themselves: each ``conf/quant/<option>.yaml`` names its
method and the class that runs it (``backend: qpipe.backends.gptq:GptqBackend``), qpipe's
built-ins and a user's own (``./conf/quant/`` of the working directory, searched first, as
Hydra searches it) alike. A new backend is one module and one YAML: nothing here changes.

Imports are lazy: choosing ``quant=bnb_nf4`` must not import llm-compressor, and a missing
optional library only matters to the method that needs it.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from qpipe.backends.base import Backend, QuantizeRequest, QuantizeResult
from qpipe.config.compose import group_options, read_option
from qpipe.errors import ConfigError
from qpipe.memory.formats import WeightFormat


@functools.cache
def _registry_at(cwd: str) -> tuple[dict[str, str], dict[str, str]]:
    """({method: "module:Class"}, {option: method}) from the quant options seen from ``cwd``."""
    backends: dict[str, str] = {}
    methods: dict[str, str] = {}
    for option, path in group_options("quant").items():
        yaml = read_option(path, "quant")
        method = yaml.get("method")
        if not isinstance(method, str) or not method:
            raise ConfigError(f"{path}: no method; a quant option names its method (method: x)")
        methods[option] = method
        spec = yaml.get("backend")
        if spec is not None:
            # the user's conf/ comes first: its backend for a method replaces the built-in's
            backends.setdefault(method, str(spec))
    missing = sorted({m for m in methods.values() if m not in backends})
    if missing:
        options = [o for o, m in methods.items() if m == missing[0]]
        raise ConfigError(
            f"quant.method={missing[0]!r} (quant={options[0]}) has no backend: name the class "
            "that runs it in its YAML (backend: package.module:Class)"
        )
    return backends, methods


def _registry() -> tuple[dict[str, str], dict[str, str]]:
    return _registry_at(str(Path.cwd()))


def methods() -> tuple[str, ...]:
    """Every quant method a backend is registered for, in option order."""
    return tuple(dict.fromkeys(_registry()[1].values()))


def quant_options() -> dict[str, str]:
    """Every quant option (``bnb_nf4``, ``gptq``, a user's own) with its method."""
    return dict(_registry()[1])


def _load_class(spec: str, method: str) -> type:
    module_name, _, cls_name = spec.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # a user's backend lives beside their conf/, as a user stage does
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"quant.method={method!r}: its backend {spec!r} cannot be imported ({err})"
        ) from None
    cls = getattr(module, cls_name, None) if cls_name else None
    if cls is None:
        raise ConfigError(
            f"quant.method={method!r}: {module_name} has no class {cls_name!r}; name it as "
            "backend: package.module:Class"
        )
    return cls


def get_backend(method: str) -> Backend:
    """The backend for ``quant.method``; a clear error naming the valid methods otherwise."""
    backends = _registry()[0]
    if method not in backends:
        raise ConfigError(f"quant.method={method!r} is not known; valid: {', '.join(methods())}")
    return _load_class(backends[method], method)()


def option_label(option: str, method: str | None, bits: object) -> str:
    """``gptq-w3``, ``bnb_nf4``, ``none``: the quant option, with the width where its method
    runs at several (a run's name, a point on the Pareto plot)."""
    if method in _registry()[0] and get_backend(method).bits_in_run_name:
        return f"{option}-w{bits}"
    return option


def option_config(option: str) -> dict[str, Any]:
    """A quant option's YAML as plain data (what ``quant=<option>`` composes)."""
    path = group_options("quant").get(option)
    if path is None:
        raise ConfigError(f"quant={option!r} is not known; valid: {', '.join(quant_options())}")
    return OmegaConf.to_container(read_option(path, "quant"), resolve=True)


def weight_format_of(
    quant: dict[str, Any], dtype_bytes: int, device: str, kernel: str = "auto"
) -> WeightFormat:
    """How ``quant``'s layers sit in memory on ``device`` with the kernel its backend resolves
    for ``kernel`` there: what the memory budget prices an option with."""
    backend = get_backend(quant["method"])
    resolved = backend.resolve_kernel(kernel, quant, device)
    return backend.weight_format(quant, dtype_bytes, device, resolved)


def finetune_base_option(kind: str, current: dict[str, Any] | None = None) -> dict[str, Any]:
    """The quant option fine-tuning of ``kind`` trains over (``dense``: full and LoRA;
    ``qlora``: a 4-bit base): ``current`` when it is one, else the first registered option
    whose backend says it is (options of one kind hold their weights alike)."""
    if current is not None and get_backend(current["method"]).finetune_base(current) == kind:
        return current
    for option, method in quant_options().items():
        quant = option_config(option)
        if get_backend(method).finetune_base(quant) == kind:
            return quant
    raise ConfigError(f"no quant option is a base fine-tuning of kind {kind!r} trains over")


def finetune_base_options(kind: str) -> list[str]:
    """Every quant option fine-tuning of ``kind`` may train over (for an error's hint)."""
    return [
        option
        for option, method in quant_options().items()
        if get_backend(method).finetune_base(option_config(option)) == kind
    ]


def kernel_names() -> set[str]:
    """Every ``kernel`` value some registered backend runs (and ``auto``)."""
    names = {"auto"}
    for method in methods():
        names.update(get_backend(method).kernels)
    return names


def fixed_kernel(backend: Backend, requested: str) -> str:
    """For a method whose matmuls no kernel setting changes (``kernels`` holds one): that
    kernel, once ``requested`` is a kernel some backend runs (a sweep may set one for all)."""
    if requested != "auto" and requested not in kernel_names():
        raise ConfigError(
            f"kernel={requested!r} is not valid; use one of: {', '.join(sorted(kernel_names()))}"
        )
    return backend.kernels[0]


__all__ = [
    "Backend",
    "QuantizeRequest",
    "QuantizeResult",
    "finetune_base_option",
    "fixed_kernel",
    "finetune_base_options",
    "get_backend",
    "kernel_names",
    "methods",
    "option_config",
    "option_label",
    "quant_options",
    "weight_format_of",
]
