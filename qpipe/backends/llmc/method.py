"""What each method run through llm-compressor states about itself, and where to find it:
on its backend class (``GptqBackend``, ``AwqBackend``, ``Fp8Backend``; RTN's are
``LlmcBackend``'s defaults), looked up by ``quant.method``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

import torch

from qpipe.errors import ConfigError


class LlmcMethod(Protocol):
    Options: type  # its own ``quant`` keys, typed (beyond name/method/bits/group_size)
    bit_widths: tuple[int, ...]
    calibrates: bool  # whether oneshot needs calibration data

    def legal_group_sizes(self, quant: dict[str, Any]) -> list[int] | None:
        """Group sizes its scheme accepts besides 0 (per channel)."""
        ...

    def check_options(self, quant: Mapping[str, Any]) -> None:
        """ConfigError for a bad value of the method's own options."""
        ...

    def config_groups(
        self,
        quant: Mapping[str, Any],
        targets: Sequence[str],
        pad_plan: Mapping[str, Any] | None,
        bits: Mapping[str, int] | None,
    ) -> dict[str, dict[str, Any]]:
        """compressed-tensors config groups: the scheme of its targets."""
        ...

    def modifiers(
        self,
        quant: Mapping[str, Any],
        scheme: dict[str, Any],
        model: torch.nn.Module | None,
        targets: Sequence[str],
    ) -> dict[str, Any]:
        """The recipe's modifiers for ``scheme`` (compressed-tensors' ``ignore`` and
        ``config_groups``); ``model``, when given, is the one about to be quantized."""
        ...

    def before_oneshot(self) -> None:
        """What the method needs of the library before ``oneshot`` runs."""
        ...


def llmc_method(method: str) -> LlmcMethod:
    """The facts of ``method``, whose backend runs it through llm-compressor."""
    # through the registry: the method modules import this package, not the reverse
    from qpipe.backends import get_backend

    backend = get_backend(method)
    if not hasattr(backend, "modifiers"):
        raise ConfigError(f"quant.method={method!r} does not run through llm-compressor")
    return cast(LlmcMethod, backend)
