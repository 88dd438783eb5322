"""Where the quantization targets sit in a model: its Linear layers and the repeated decoder
blocks that hold them (calibration runs one block at a time; AWQ scopes its mappings there)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def decoder_blocks(model: torch.nn.Module, targets: Sequence[str]) -> tuple[str, str] | None:
    """(path of the ModuleList, class of its blocks) of the repeated decoder layers that hold
    the quantization targets: ("model.language_model.layers", "Qwen3DecoderLayer") for
    InternVL. Targets outside any block (lm_head) are passed over."""
    for target in targets:
        parts = target.split(".")
        for depth in range(1, len(parts)):
            parent = ".".join(parts[: depth - 1])
            if isinstance(model.get_submodule(parent), torch.nn.ModuleList):
                child = model.get_submodule(".".join(parts[:depth]))
                return parent, type(child).__name__
    return None
