"""The llm-compressor recipe as plain data (YAML-ready) from the ``quant`` config: the
compressed-tensors scheme of each method's targets (grouped integers for most, as
``config_groups`` below writes them; a method may state its own) and its modifiers, both from
its backend class (``GptqBackend.modifiers``, ``AwqBackend.modifiers``, RTN's on
``LlmcBackend``).

The recipe is written as YAML and handed to ``oneshot`` as that YAML: the file saved next to
the checkpoint (``recipe.yaml``) is exactly what ran, and
``llmcompressor.oneshot(model=..., recipe="recipe.yaml")`` reproduces it."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import yaml

from qpipe.backends.align import module_group_size
from qpipe.backends.llmc.method import llmc_method


def _weights_args(quant: Mapping[str, Any], group_size: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_bits": int(quant["bits"]),
        "type": "int",
        "symmetric": bool(quant.get("symmetric", True)),
    }
    if group_size > 0:
        args.update(strategy="group", group_size=group_size)
    else:
        args["strategy"] = "channel"
    return args


def _compact_targets(names: Sequence[str], same_leaf_elsewhere: set[str]) -> list[str]:
    """Module names as a short target list: ``re:.*\\.<leaf>$`` for a leaf name (q_proj...)
    whose targeted modules all fall in this group, exact names otherwise."""
    by_leaf: dict[str, list[str]] = defaultdict(list)
    for n in names:
        by_leaf[n.rsplit(".", 1)[-1]].append(n)
    out: list[str] = []
    for leaf, members in sorted(by_leaf.items()):
        if leaf in same_leaf_elsewhere:
            out.extend(sorted(members))
        else:
            out.append(f"re:.*\\.{re.escape(leaf)}$" if "." in members[0] else members[0])
    return out


def config_groups(
    quant: Mapping[str, Any],
    targets: Sequence[str],
    pad_plan: Mapping[str, Any] | None,
    bits: Mapping[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """compressed-tensors config groups: one per (bit width, group size) the targets use
    (``bits``: a mixed plan's width per module; absent ones use ``quant.bits``). A single
    group targets every ``Linear`` (the recipe's ``ignore`` keeps the rest out)."""
    default = int(quant.get("group_size") or 0)
    width = int(quant["bits"])
    by_scheme: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name in targets:
        gs = module_group_size(pad_plan, name, default)
        by_scheme[(int((bits or {}).get(name, width)), gs)].append(name)
    if len(by_scheme) <= 1:
        b, gs = next(iter(by_scheme), (width, default))
        args = _weights_args({**quant, "bits": b}, gs)
        return {"group_0": {"targets": ["Linear"], "weights": args}}
    leaves = {key: {n.rsplit(".", 1)[-1] for n in names} for key, names in by_scheme.items()}
    groups = {}
    for i, (key, names) in enumerate(sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))):
        elsewhere = set().union(*(lv for k, lv in leaves.items() if k != key))
        groups[f"group_{i}"] = {
            "targets": _compact_targets(names, elsewhere),
            "weights": _weights_args({**quant, "bits": key[0]}, key[1]),
        }
    return groups


def build_recipe(
    quant: Mapping[str, Any],
    targets: Sequence[str],
    ignore: Sequence[str],
    pad_plan: Mapping[str, Any] | None = None,
    bits: Mapping[str, int] | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """The llm-compressor recipe for ``quant`` as plain data (YAML-ready); ``bits`` gives a
    mixed plan's width per target; ``model`` lets a method write what it reads from the
    architecture into the recipe (AWQ's mappings)."""
    method = llmc_method(quant["method"])
    groups = method.config_groups(quant, targets, pad_plan, bits)
    scheme = {"ignore": list(ignore), "config_groups": groups}
    modifiers = method.modifiers(quant, scheme, model, targets)
    return {"quant_stage": {"quant_modifiers": modifiers}}


def recipe_yaml(recipe: Mapping[str, Any]) -> str:
    header = "# llm-compressor recipe written by qpipe; re-run with oneshot(recipe=this file)\n"
    return header + yaml.safe_dump(dict(recipe), sort_keys=False, width=100)
