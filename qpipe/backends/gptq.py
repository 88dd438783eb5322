"""GPTQ (Frantar et al., 2022) through llm-compressor's GPTQModifier.

AutoGPTQ is archived; llm-compressor runs the same algorithm (Hessian-guided rounding, column
by column, with optional activation ordering) and writes compressed-tensors checkpoints.
``load`` also reads AutoGPTQ-format folders (``qpipe.backends.legacy``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any  # noqa: UP035 (OmegaConf reads the Options annotations)

import torch

from qpipe.backends.llmc import LlmcBackend
from qpipe.backends.llmc.validation import is_int
from qpipe.errors import ConfigError
from qpipe.memory.onload import CalibrationMemory

ACT_ORDERS = ("static", "group", "weight", "none")


def _act_order(quant: Mapping[str, Any]) -> Any:
    act = quant.get("act_order", "static")
    return "none" if act is None else act


class GptqBackend(LlmcBackend):
    @dataclass
    class Options(LlmcBackend.Options):
        act_order: str | None = "static"  # static | group (g_idx saved) | weight | none
        dampening: float = 0.01  # fraction of the Hessian's mean diagonal added for stability
        block_size: int = 128  # columns rounded per GPTQ block

    name = "gptq"
    bit_widths = (2, 3, 4, 8)
    calibrates = True  # the Hessians come from the calibration activations
    calibration_memory = CalibrationMemory(hessians=True)

    def check_options(self, quant: Mapping[str, Any]) -> None:
        act = _act_order(quant)
        if act not in ACT_ORDERS:
            raise ConfigError(
                f"quant.act_order={quant.get('act_order')!r} is not valid; use one of {', '.join(ACT_ORDERS)}"
            )
        damp = quant.get("dampening", 0.01)
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp <= 1:
            raise ConfigError(f"quant.dampening={damp!r} is not valid; use a number in (0, 1]")
        block = quant.get("block_size", 128)
        if not is_int(block) or block < 1:
            raise ConfigError(f"quant.block_size={block!r} is not valid; use a positive integer")

    def modifiers(
        self,
        quant: Mapping[str, Any],
        scheme: dict[str, Any],
        model: torch.nn.Module | None,
        targets: Sequence[str],
    ) -> dict[str, Any]:
        act = _act_order(quant)
        return {
            "GPTQModifier": {
                **scheme,
                "dampening_frac": float(quant.get("dampening", 0.01)),
                "block_size": int(quant.get("block_size", 128)),
                "actorder": None if act == "none" else act,
            }
        }
