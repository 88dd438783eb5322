"""The memory/quality trade-off of a sweep: which runs no other run beats on both measured peak
memory and perplexity loss (the Pareto front), drawn with decode speed as colour."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class Point:
    label: str
    memory_gb: float
    quality_loss: float  # perplexity Δ% vs the unquantized model (lower is better)
    decode_tok_s: float | None = None


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the points that no other point beats on both memory and quality loss (lower
    is better on both; a tie on both keeps every tied point), ordered by memory."""
    front = []
    for i, p in enumerate(points):
        dominated = any(
            q.memory_gb <= p.memory_gb
            and q.quality_loss <= p.quality_loss
            and (q.memory_gb < p.memory_gb or q.quality_loss < p.quality_loss)
            for q in points
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i].memory_gb, points[i].quality_loss))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def pareto_plot(
    points: Sequence[Point],
    path: Path,
    title: str,
    memory_label: str = "measured peak memory (GB)",
    quality_label: str = "perplexity Δ vs unquantized (%)",
) -> Path:
    """Scatter of memory against quality loss, the front joined by a step line, decode tok/s
    as colour (grey where it was not measured)."""
    points = [p for p in points if _finite(p.memory_gb) and _finite(p.quality_loss)]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    speeds = [p.decode_tok_s for p in points if _finite(p.decode_tok_s)]
    if points:
        front = pareto_front(points)
        xs = [points[i].memory_gb for i in front]
        ys = [points[i].quality_loss for i in front]
        ax.step(
            xs, ys, where="post", color="#C44E52", linewidth=1.2, zorder=1, label="Pareto front"
        )
        scatter = None
        for i, p in enumerate(points):
            colour_value = p.decode_tok_s if _finite(p.decode_tok_s) else None
            kwargs = {"s": 90 if i in front else 50, "edgecolors": "black", "zorder": 2}
            if colour_value is None or not speeds:
                ax.scatter([p.memory_gb], [p.quality_loss], color="#BBBBBB", **kwargs)
            else:
                scatter = ax.scatter(
                    [p.memory_gb],
                    [p.quality_loss],
                    c=[colour_value],
                    cmap="viridis",
                    vmin=min(speeds),
                    vmax=max(speeds) if max(speeds) > min(speeds) else min(speeds) + 1,
                    **kwargs,
                )
            ax.annotate(
                p.label,
                (p.memory_gb, p.quality_loss),
                textcoords="offset points",
                xytext=(6, 5),
                fontsize=8,
                fontweight="bold" if i in front else "normal",
            )
        if scatter is not None:
            fig.colorbar(scatter, ax=ax, label="decode tokens/s")
        losses = [abs(p.quality_loss) for p in points]
        if max(losses) > 100 * max(min(losses), 1.0):
            # A collapsed run (2-bit RTN: +10^6 %) would flatten the rest: log scale, linear
            # near zero where losses may be negative.
            ax.set_yscale("symlog", linthresh=1.0)
            quality_label += " (symlog)"
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(
            0.5,
            0.5,
            "no finished run with memory and perplexity yet",
            ha="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel(memory_label)
    ax.set_ylabel(quality_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
