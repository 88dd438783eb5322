"""The workarounds qpipe applies to llm-compressor, kept here so they are easy to find and drop.

1. llm-compressor 0.14's AWQModifier pins its cached activations before the grid search
(``IntermediatesCache.pin_memory``) to speed up host-to-device copies. On a machine with no
accelerator, ``Tensor.pin_memory()`` raises "Cannot access accelerator device when none is
available", so AWQ cannot run on CPU at all. Pinning is only an optimisation for H2D copies,
which do not happen without an accelerator, so skipping it there changes no result.

Remove it (and its call in ``AwqBackend.before_oneshot``) once llm-compressor guards the pinning
itself (check ``IntermediatesCache.pin_memory`` when upgrading past 0.14), i.e. when
``tests/test_llmc_backends.py::test_awq_*`` passes on CPU without it.

2. The sequential pipeline (GPTQ, AWQ) traces the model with torch.fx and registers wrapped
functions in torch.fx's module-level ``_wrapped_fns_to_patch``, keyed by the namespace of the
code it generated, which holds the model. The entry outlives ``oneshot``, so the calibrated
model stays alive for the life of the process: measured on an H200, 6.1 GB of an 8B model's
GPU memory still held when the next stage loads the checkpoint. ``forget_fx_wraps`` drops the
entries a call added. Remove it when ``test_llmc_backends.py::test_oneshot_frees_the_model``
passes without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_APPLIED = False


def skip_pinning_without_accelerator() -> None:
    """Make ``IntermediatesCache.pin_memory`` a no-op when there is no accelerator.
    Idempotent; does nothing on machines with an accelerator."""
    global _APPLIED
    if _APPLIED or torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    def _no_pin(self, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = _no_pin
    _APPLIED = True


@contextmanager
def forget_fx_wraps() -> Iterator[None]:
    """Remove the torch.fx wrap registrations made inside the block (see 2. above)."""
    from torch.fx import _symbolic_trace

    registry = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)
    before = set(registry) if isinstance(registry, dict) else set()
    try:
        yield
    finally:
        if isinstance(registry, dict):
            for key in set(registry) - before:
                registry.pop(key, None)
