"""Saving the compressed-tensors ``pack-quantized`` checkpoint (transformers and vLLM load
it) with its recipe and the tokenizer, so that a folder is self-contained."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def _name_both_ways(out: Path, recipe: Mapping[str, Any]) -> None:
    """transformers saves some architectures under their original checkpoint names (InternVL:
    ``vision_tower.*`` for the module ``model.vision_tower.*``) and renames the quantization
    config's module names with them, but does not rename them back when it loads: the vision
    tower would no longer be ignored, and loading fails. The config lists each name in both
    forms (a name that matches no module is harmless)."""
    path = Path(out) / "config.json"
    config = json.loads(path.read_text())
    qcfg = config.get("quantization_config") or {}
    modifiers = recipe["quant_stage"]["quant_modifiers"]
    scheme = next(m for m in modifiers.values() if "config_groups" in m)

    def union(saved: list[str], ours: list[str]) -> list[str]:
        return list(dict.fromkeys([*saved, *ours]))

    def kind(group: Mapping[str, Any]) -> tuple:
        weights = group.get("weights") or {}
        return tuple(weights.get(k) for k in ("num_bits", "group_size", "symmetric", "strategy"))

    qcfg["ignore"] = union(list(qcfg.get("ignore") or []), list(scheme["ignore"]))
    for group in (qcfg.get("config_groups") or {}).values():
        # compressed-tensors numbers the saved groups afresh: a mixed plan's saved group_0 may
        # be the recipe's group_1. Groups are matched by their weights' scheme, never by name.
        ours = [
            t
            for g in scheme["config_groups"].values()
            if kind(g) == kind(group)
            for t in g.get("targets", [])
        ]
        group["targets"] = union(list(group.get("targets") or []), ours)
    path.write_text(json.dumps(config, indent=2) + "\n")


def save_checkpoint(
    model: torch.nn.Module, tokenizer: Any, recipe_text: str, recipe: Mapping[str, Any], out: Path
) -> Path:
    """Write the calibrated ``model`` compressed into ``out``; the path of its recipe file."""
    model.save_pretrained(out, save_compressed=True)
    _name_both_ways(out, recipe)
    # llm-compressor writes its own serialisation of the recipe (with Python-object tags that
    # yaml.safe_load rejects); the file we ran is the readable, re-runnable one.
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(recipe_text)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return recipe_path
