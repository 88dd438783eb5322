"""Pictures for the MLflow run: where the memory goes, estimate against measurement."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

_PARTS = (
    ("weights_quantized_gb", "quantized weights", "#4C72B0"),
    ("weights_high_precision_gb", "high-precision weights", "#55A868"),
    ("quant_overhead_gb", "quant state (scales, zeros)", "#8172B2"),
    ("buffers_gb", "buffers", "#937860"),
    ("kv_cache_gb", "KV cache", "#C44E52"),
    ("activations_gb", "activations", "#DD8452"),
    ("optimizer_gb", "grads + optimizer", "#DA8BC3"),
    ("runtime_gb", "CUDA context", "#8C8C8C"),
)


def memory_breakdown(
    estimates: dict[str, dict[str, float]],
    capacity_gb: float | None,
    title: str,
    path: Path,
    chosen: str | None = None,
    measured_gb: float | None = None,
) -> Path:
    """Stacked bars, one per precision option, against the device's capacity."""
    names = list(estimates)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 3, 4.5))
    bottoms = [0.0] * len(names)
    for key, label, color in _PARTS:
        values = [estimates[n].get(key, 0.0) for n in names]
        if not any(values):
            continue
        ax.bar(names, values, bottom=bottoms, label=label, color=color, width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    for i, total in enumerate(bottoms):
        ax.text(i, total, f"{total:.2f}", ha="center", va="bottom", fontsize=9)
    # A capacity far above every bar would flatten them: then it goes in the title instead.
    if capacity_gb and capacity_gb <= 3 * max(bottoms, default=0.0):
        ax.axhline(capacity_gb, color="black", linestyle="--", linewidth=1)
        ax.text(-0.4, capacity_gb, f"capacity {capacity_gb:.1f} GB", va="bottom")
    elif capacity_gb:
        title = f"{title} (capacity {capacity_gb:.1f} GB)"
    if measured_gb is not None and chosen in names:
        ax.plot([names.index(chosen)], [measured_gb], marker="D", color="black", label="measured")
    if chosen in names:
        ax.get_xticklabels()[names.index(chosen)].set_fontweight("bold")
    ax.set_ylabel("GB")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
