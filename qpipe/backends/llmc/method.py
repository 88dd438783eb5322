"""What each method run through llm-compressor states about itself, and where to find it:
on its backend class (``GptqBackend``, ``AwqBackend``; RTN's are ``LlmcBackend``'s
defaults), looked up by ``quant.method``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

import torch

# The methods that run through llm-compressor, in the order the error messages name them.
LLMC_METHODS = ("gptq", "awq", "rtn")


class LlmcMethod(Protocol):
    options: frozenset[str]  # its ``quant`` keys beyond name/method/bits/group_size/symmetric
    bit_widths: tuple[int, ...]
    calibrates: bool  # whether oneshot needs calibration data

    def check_options(self, quant: Mapping[str, Any]) -> None:
        """ConfigError for a bad value of the method's own ``options``."""

    def modifiers(
        self,
        quant: Mapping[str, Any],
        scheme: dict[str, Any],
        model: torch.nn.Module | None,
        targets: Sequence[str],
    ) -> dict[str, Any]:
        """The recipe's modifiers for ``scheme`` (compressed-tensors' ``ignore`` and
        ``config_groups``); ``model``, when given, is the one about to be quantized."""

    def before_oneshot(self) -> None:
        """What the method needs of the library before ``oneshot`` runs."""


def llmc_method(method: str) -> LlmcMethod:
    """The facts of ``method`` (one of ``LLMC_METHODS``)."""
    # through the registry: the method modules import this package, not the reverse
    from qpipe.backends import get_backend

    return cast(LlmcMethod, get_backend(method))
