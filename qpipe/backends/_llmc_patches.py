"""The one workaround qpipe applies to llm-compressor, kept here so it is easy to find and drop.

llm-compressor 0.14's AWQModifier pins its cached activations before the grid search
(``IntermediatesCache.pin_memory``) to speed up host-to-device copies. On a machine with no
accelerator, ``Tensor.pin_memory()`` raises "Cannot access accelerator device when none is
available", so AWQ cannot run on CPU at all. Pinning is only an optimisation for H2D copies,
which do not happen without an accelerator, so skipping it there changes no result.

Remove this module (and its one call in ``qpipe.backends.llmc``) once llm-compressor guards the
pinning itself (check ``IntermediatesCache.pin_memory`` when upgrading past 0.14), i.e. when
``tests/test_llmc_backends.py::test_awq_*`` passes on CPU without it.
"""

from __future__ import annotations

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
