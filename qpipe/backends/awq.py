"""AWQ (Lin et al., 2023) through llm-compressor: AWQModifier searches per-channel scales that
protect the weights salient to the activations, then QuantizationModifier rounds.

AutoAWQ is deprecated; checkpoints are compressed-tensors. ``load`` also reads AutoAWQ GEMM
folders (``qpipe.backends.legacy``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qpipe.backends.llmc import LlmcBackend
from qpipe.backends.llmc.layers import decoder_blocks
from qpipe.backends.llmc.validation import is_int
from qpipe.errors import ConfigError
from qpipe.memory.onload import CalibrationMemory


def _scoped(pattern: str, prefix: str) -> str:
    # "re:.*input_layernorm$" -> "re:model\.language_model\..*input_layernorm$"
    if prefix and pattern.startswith("re:.*"):
        return "re:" + re.escape(prefix) + pattern[3:]
    return pattern


def awq_mappings(model: torch.nn.Module, targets: Sequence[str]) -> list[dict[str, Any]]:
    """The library's AWQ mappings for this architecture (Llama, Qwen3, ...), written into the
    recipe so that it states what was smoothed instead of relying on inference. The library's
    patterns match any module with the leaf name; they are scoped to where the targets live,
    so that a VLM's vision tower (whose q/k/v projections have no o_proj) stays out."""
    from llmcompressor.modifiers.transform.awq import get_layer_mappings_from_model

    blocks = decoder_blocks(model, targets)
    prefix = blocks[0] + "." if blocks else ""
    out = []
    for m in get_layer_mappings_from_model(model):
        entry = {
            "smooth_layer": _scoped(m.smooth_layer, prefix),
            "balance_layers": [_scoped(b, prefix) for b in m.balance_layers],
        }
        if m.activation_hook_target is not None:
            entry["activation_hook_target"] = m.activation_hook_target
        out.append(entry)
    return out


class AwqBackend(LlmcBackend):
    @dataclass
    class Options(LlmcBackend.Options):
        duo_scaling: Any = True  # true: scales from activations and weights | false | both
        n_grid: int = 20  # grid points searched per scale; time grows linearly with it

    name = "awq"
    bit_widths = (4, 8)
    calibrates = True  # the scales are searched on the calibration activations
    calibration_memory = CalibrationMemory(layer_outputs=True)

    def check_options(self, quant: Mapping[str, Any]) -> None:
        duo = quant.get("duo_scaling", True)
        if not (duo is True or duo is False or duo == "both"):
            raise ConfigError(f"quant.duo_scaling={duo!r} is not valid; use true, false or both")
        # the grid's points are i / (n - 1) (n - 2 with duo_scaling, n / 2 - 1 with both):
        # fewer points divide by zero inside llm-compressor
        least = {True: 3, "both": 4}.get(duo, 2)
        grid = quant.get("n_grid", 20)
        if not is_int(grid) or grid < least:
            raise ConfigError(
                f"quant.n_grid={grid!r} is not valid with quant.duo_scaling={duo}; use an "
                f"integer >= {least}"
            )

    def modifiers(
        self,
        quant: Mapping[str, Any],
        scheme: dict[str, Any],
        model: torch.nn.Module | None,
        targets: Sequence[str],
    ) -> dict[str, Any]:
        awq: dict[str, Any] = {
            "duo_scaling": quant.get("duo_scaling", True),
            "n_grid": int(quant.get("n_grid", 20)),
        }
        if model is not None:
            awq["mappings"] = awq_mappings(model, targets)
        # AWQ only rescales (exactly, in full precision); the quantizer after it rounds.
        return {"AWQModifier": awq, "QuantizationModifier": scheme}

    def before_oneshot(self) -> None:
        from qpipe.backends.llmc.patches import skip_pinning_without_accelerator

        skip_pinning_without_accelerator()
