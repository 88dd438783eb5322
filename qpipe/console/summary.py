"""The lines a run ends with: every number labelled (estimated or measured, peak with or
without the runtime), the estimate of every quant option after an estimate-only run, and a
word when ``outputs/`` grows past a few GB."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from qpipe.store.paths import outputs_root

# metric -> (what it is, unit); "{...}" fields are filled from the run (see ``labels``).
LABELS: dict[str, tuple[str, str]] = {
    "mem.est_weights_gb": ("weights, estimated", "GB"),
    "mem.est_peak_gb": ("peak, estimated (no runtime)", "GB"),
    "mem.est_total_gb": ("peak + {reserve} reserve + {runtime} runtime, est.", "GB"),
    "mem.measured_peak_gb": ("peak, measured ({measured_on})", "GB"),
    "mem.est_error_pct": ("est. peak vs measured peak", "%"),
    "mem.nvml_process_gb": ("total, measured (NVML: what nvidia-smi shows)", "GB"),
    "mem.est_total_error_pct": ("est. total vs measured total", "%"),
    "quality.ppl": ("perplexity on {text}", ""),
    "quality.ppl_delta_pct": ("perplexity vs unquantized", "%"),
    "quality.kld": ("KL vs unquantized (top-{top_k})", ""),
    "quality.embed_cosine_mean": ("embedding cosine vs unquant.", ""),
    "perf.ttft_ms": ("time to first token ({prefill} tok)", "ms"),
    "perf.prefill_tok_s": ("prefill speed", "tok/s"),
    "perf.decode_tok_s": ("decode speed, batch 1", "tok/s"),
    "time.quantize_s": ("quantize time", "s"),
    "time.warmup_s": ("compile + kernel tuning", "s"),
    "time.cold_warmup_s": ("...the same, first run ({cold})", "s"),
    "time.cache_saved_s": ("saved by outputs/cache", "s"),
}
QUALITY_PREFIX = "quality."
# When outputs/ passes this many GB, the end of a run says so (QPIPE_OUTPUTS_WARN_GB moves it).
OUTPUTS_WARN_GB = 5.0


def random_weights(model_cfg: Mapping[str, Any]) -> bool:
    """The model is built from its config with random weights (a model.path wins)."""
    return model_cfg.get("weights") == "random" and not model_cfg.get("path")


def number(value: float, unit: str = "") -> str:
    """``0.102 GB``, ``21.24``, ``491 ms``: three or four figures, never ``5.022e+04``."""
    if value != value or value in (float("inf"), float("-inf")):  # NaN, inf: said as such
        return f"{value} {unit}".rstrip()
    size = abs(value)
    if size >= 100 or value == int(value) and size >= 1:
        text = f"{value:,.0f}"
    elif size >= 10:
        text = f"{value:.2f}"
    elif size >= 0.01 or value == 0:
        text = f"{value:.3g}"
    else:
        text = f"{value:.2e}"
    return f"{text} {unit}".rstrip()


def _fields(cfg: Any, report: Any) -> dict[str, str]:
    validate = report.results.get("validate_vram")
    ev = cfg.get("eval") or {}
    bench = report.results.get("benchmark")
    warmup = (bench.outputs.get("warmup") if bench else None) or {}
    return {
        "runtime": number(report.metrics.get("mem.est_runtime_gb", 0.0)),
        "reserve": number(report.metrics.get("mem.est_reserve_gb", 0.0)),
        "cold": str(warmup.get("cold_date") or "an earlier run"),
        "measured_on": (validate.outputs.get("measured_on") if validate else None) or "—",
        "text": str(ev.get("name") or "eval text"),
        "top_k": str(ev.get("top_k", 32)),
        "prefill": str(ev.get("prefill_tokens", "?")),
    }


def metrics_table(cfg: Any, report: Any) -> tuple[Table, bool]:
    """The run's headline numbers, each with what it is and its MLflow name; and whether
    quality numbers were left out (random weights make them noise)."""
    table = Table()
    table.add_column("what", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("MLflow metric", style="dim", overflow="ellipsis", no_wrap=True)
    fields = _fields(cfg, report)
    noise = random_weights(cfg.model)
    left_out = False
    metrics = dict(report.metrics)
    if metrics.get("mem.est_runtime_gb", 0.0) + metrics.get("mem.est_reserve_gb", 0.0) <= 0:
        metrics.pop("mem.est_total_gb", None)  # the same number as the peak
    for name, (what, unit) in LABELS.items():
        if name not in metrics:
            continue
        if noise and name.startswith(QUALITY_PREFIX):
            left_out = True
            continue
        table.add_row(what.format(**fields), number(metrics[name], unit), name)
    return table, left_out


def options_table(budget: Mapping[str, Any], chosen: str, hardware: str) -> Table:
    """Every quant option's estimate (peak + runtime) against the usable memory."""
    usable = float(budget["usable_gb"])
    table = Table(title=f"estimated GB (peak + runtime) per quant option, {hardware}")
    table.add_column("quant")
    table.add_column("est. GB", justify="right")
    table.add_column(f"fits {number(usable)} usable", justify="center")
    for name, total in sorted(budget["options"].items(), key=lambda kv: kv[1]):
        mark = " (this run)" if name == chosen else ""
        table.add_row(f"{name}{mark}", number(total), "yes" if total <= usable else "no")
    return table


def tree_gb(path: Path) -> float:
    """Bytes under ``path`` (files only, links not followed), in GB."""
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total / 1e9


def outputs_warning(root: Path | None = None, limit_gb: float | None = None) -> str | None:
    """One line when ``outputs/`` holds more than ``limit_gb`` (None below it)."""
    root = root or outputs_root()
    if limit_gb is None:
        limit_gb = float(os.environ.get("QPIPE_OUTPUTS_WARN_GB", OUTPUTS_WARN_GB))
    if not root.is_dir():
        return None
    size = tree_gb(root)
    if size <= limit_gb:
        return None
    cache = tree_gb(root / "cache") if (root / "cache").is_dir() else 0.0
    return (
        f"{root} holds {number(size)} GB ({number(cache)} GB of caches): "
        "python -m qpipe.cache lists them and clears what no run uses"
    )
