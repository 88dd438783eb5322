"""The record of a cached stage result (``result.json`` in its entry): what it must hold to be
reused as a result, and the numbers that never are one."""

from __future__ import annotations

import math
from typing import Any

RECORD = "result.json"


def non_finite(metrics: dict[str, Any]) -> list[str]:
    """The metrics that are not finite numbers, as ``name=value``."""
    return [f"{k}={v}" for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]


def record_problem(data: Any) -> str | None:
    """Why a cached stage's result.json cannot be a result (None when it can): its keys and
    their types, and no NaN/inf among its metrics."""
    if not isinstance(data, dict):
        return f"{RECORD} holds {type(data).__name__}, not a record"
    kinds = {"outputs": dict, "metrics": dict, "params": dict, "artifacts": list}
    missing = [k for k in kinds if k not in data]
    if missing:
        return f"{RECORD} lacks {', '.join(missing)}"
    wrong = [k for k, kind in kinds.items() if not isinstance(data[k], kind)]
    if wrong:
        return f"{RECORD}: {', '.join(wrong)} of the wrong type"
    if not all(isinstance(a, str) for a in data["artifacts"]):
        return f"{RECORD}: artifacts must be file names"
    bad = non_finite(data["metrics"])
    if bad:
        return f"{RECORD} holds {', '.join(bad)}; a NaN/inf result is never reused"
    return None
