"""Make layer shapes legal for a grouped quantization format: the pure logic of pad_align.

A group of ``group_size`` input columns shares one scale (and zero), so the format needs the
group size to divide each layer's input width K. SmolLM2's hidden size is 576 = 4.5 x 128:
llm-compressor refuses group_size 128 on its q/k/v/gate/up projections. Two exact remedies:

- regroup: use, for that module only, the largest legal group size <= the requested one that
  divides K (576 -> 64). The weights stay in the library's format, loadable anywhere.
- pad: zero-pad K up to a multiple of the group size (576 -> 640) and pad the activation with
  zeros inside the layer. Zero columns times zero inputs add nothing, so outputs are exactly
  those of the unpadded layer; only qpipe's own layout (``QuantLinear(in_features < K)``)
  can hold such a layer.

The plan (the pad_align stage's outputs, handed verbatim to the backend as
``QuantizeRequest.pad_plan``)::

    {
      "mode": "regroup" | "pad" | "none",   # what was applied ("none": nothing to align)
      "requested_mode": "auto" | "regroup" | "pad" | "error",
      "format": "compressed-tensors" | "qpipe-w4" | null,
      "requested_group_size": 128,           # quant.group_size as configured
      "group_size": 64,                      # the group size most target modules use
      "group_sizes": {"64": 180, "128": 30}, # modules per group size (JSON keys are strings)
      "modules": {                           # only the modules that were changed
        "model.layers.0.self_attn.q_proj": {"K": 576, "group_size": 64, "pad_to": 576},
        ...                                  # pad mode: {"K": 576, "group_size": 128, "pad_to": 640}
      },
      "modules_total": 210, "modules_changed": 180, "pad_columns": 0,
      "summary": "regroup: 180/210 modules use group_size 64 instead of 128 (K=576)"
    }

A module absent from ``modules`` keeps ``requested_group_size`` and its own K.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from qpipe.errors import ConfigError

MODES = ("auto", "regroup", "pad", "error")

# Formats whose checkpoints must keep the model's shapes (loaded by transformers/vLLM) can
# only regroup; qpipe's own kernel layout can hold padded K.
FORMAT_MODES = {
    "compressed-tensors": ("regroup", "error"),
    "qpipe-w4": ("pad", "regroup", "error"),
}


def auto_mode(fmt: str | None) -> str:
    """The mode ``auto`` means for a checkpoint format: the first it supports."""
    return FORMAT_MODES.get(fmt or "", ("regroup",))[0]


def regroup_size(k: int, requested: int, legal: Sequence[int]) -> int | None:
    """The largest legal group size <= ``requested`` that divides ``k`` (None: there is none)."""
    fits = [g for g in legal if g <= requested and k % g == 0]
    return max(fits) if fits else None


def padded_k(k: int, group_size: int) -> int:
    """K rounded up to a multiple of ``group_size``."""
    return -(-k // group_size) * group_size


def _needs_change(k: int, group_size: int) -> bool:
    # group_size <= 0 means one group per output row (per-channel): always legal.
    return group_size > 0 and k % group_size != 0


def _nothing(
    requested_mode: str, fmt: str | None, group_size: int, n: int, why: str
) -> dict[str, Any]:
    return {
        "mode": "none",
        "requested_mode": requested_mode,
        "format": fmt,
        "requested_group_size": group_size,
        "group_size": group_size,
        "group_sizes": {str(group_size): n} if n else {},
        "modules": {},
        "modules_total": n,
        "modules_changed": 0,
        "pad_columns": 0,
        "summary": why,
    }


def plan_alignment(
    shapes: Mapping[str, Sequence[int]],
    targets: Sequence[str],
    *,
    group_size: int,
    legal: Sequence[int] | None,
    mode: str,
    fmt: str | None,
) -> dict[str, Any]:
    """Decide, per target module, the group size and padded K (see the module docstring).

    shapes: {module: [out_features, in_features]} for (at least) every target.
    legal: group sizes the format accepts; None means the method has no groups (bnb, none).
    Raises ConfigError (one line) for an unknown mode, a mode the format cannot hold, or
    ``mode=error`` / no legal regrouping when some K is not a multiple of the group size.
    """
    if mode not in MODES:
        raise ConfigError(f"pad_align.mode={mode!r} is not valid; use one of: {', '.join(MODES)}")
    targets = list(targets)
    missing = [t for t in targets if t not in shapes]
    if missing:
        raise ConfigError(f"pad_align: no shape for target module {missing[0]!r}")
    if legal is None:
        return _nothing(
            mode, fmt, group_size, len(targets), "nothing to align: this method has no groups"
        )
    ks = {t: int(shapes[t][1]) for t in targets}
    bad = {t: k for t, k in ks.items() if _needs_change(k, group_size)}
    if not bad:
        why = f"nothing to align: every K is a multiple of group_size {group_size}"
        if group_size <= 0:
            why = "nothing to align: per-channel scales (group_size <= 0)"
        return _nothing(mode, fmt, group_size, len(targets), why)

    allowed = FORMAT_MODES.get(fmt or "", ("regroup", "error"))
    applied = auto_mode(fmt) if mode == "auto" else mode
    if applied not in allowed:
        raise ConfigError(
            f"pad_align.mode={mode!r} cannot be used with {fmt} checkpoints; "
            f"valid: auto, {', '.join(allowed)}"
        )
    if applied == "error":
        name, k = next(iter(bad.items()))
        common = [g for g in legal if all(kk % g == 0 for kk in ks.values())]
        raise ConfigError(
            f"{name} has K={k}, not a multiple of quant.group_size={group_size}; valid group "
            f"sizes for every module: {', '.join(map(str, common)) or 'none'} "
            f"(or set pad_align.mode={'|'.join(a for a in allowed if a != 'error')})"
        )

    modules: dict[str, dict[str, int]] = {}
    for name, k in bad.items():
        if applied == "regroup":
            g = regroup_size(k, group_size, legal)
            if g is None:
                raise ConfigError(
                    f"{name} has K={k}: no legal group size <= {group_size} divides it "
                    f"(legal: {', '.join(map(str, legal))}); use pad_align.mode=pad or "
                    "exclude the module"
                )
            modules[name] = {"K": k, "group_size": g, "pad_to": k}
        else:
            modules[name] = {"K": k, "group_size": group_size, "pad_to": padded_k(k, group_size)}

    sizes = Counter(modules[t]["group_size"] if t in modules else group_size for t in targets)
    pad_columns = sum(m["pad_to"] - m["K"] for m in modules.values())
    return {
        "mode": applied,
        "requested_mode": mode,
        "format": fmt,
        "requested_group_size": group_size,
        "group_size": sizes.most_common(1)[0][0],
        "group_sizes": {str(g): n for g, n in sorted(sizes.items())},
        "modules": modules,
        "modules_total": len(targets),
        "modules_changed": len(modules),
        "pad_columns": pad_columns,
        "summary": _summary(applied, modules, len(targets), group_size),
    }


def _summary(applied: str, modules: dict[str, dict[str, int]], total: int, gs: int) -> str:
    by_change = Counter(
        (m["K"], m["group_size"], m["pad_to"]) for m in modules.values()
    ).most_common()
    parts = []
    for (k, g, pad_to), n in by_change:
        if applied == "regroup":
            parts.append(f"{n}/{total} modules use group_size {g} instead of {gs} (K={k})")
        else:
            parts.append(f"{n}/{total} modules padded K={k} -> {pad_to} for group_size {g}")
    return f"{applied}: " + "; ".join(parts)


def module_group_size(plan: Mapping[str, Any] | None, name: str, default: int) -> int:
    """The group size the plan gives ``name`` (``default`` when the plan leaves it alone)."""
    entry = (plan or {}).get("modules", {}).get(name)
    return int(entry["group_size"]) if entry else default


def module_pad_to(plan: Mapping[str, Any] | None, name: str, k: int) -> int:
    """The padded K the plan gives ``name`` (``k`` itself when it is not padded)."""
    entry = (plan or {}).get("modules", {}).get(name)
    return int(entry["pad_to"]) if entry else k
