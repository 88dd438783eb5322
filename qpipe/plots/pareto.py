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


# Where a label may sit around its point (points of offset, horizontal alignment), nearest
# first; the first that covers no marker, no other label and stays inside the axes wins.
_OFFSETS = tuple(
    ((dx * r, dy * r), ha)
    for r in (1, 2, 3.5)
    for (dx, dy), ha in (
        ((7, 4), "left"),
        ((7, -12), "left"),
        ((-7, 4), "right"),
        ((-7, -12), "right"),
        ((0, 9), "center"),
        ((0, -17), "center"),
    )
)


def _marker_box(ax, point: tuple[float, float], size: float):
    """The display-space box of a scatter marker of area ``size`` (points²) at ``point``."""
    from matplotlib.transforms import Bbox

    x, y = ax.transData.transform(point)
    radius = math.sqrt(size) / 2 * ax.figure.dpi / 72 + 1
    return Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)


def _place_labels(ax, points: Sequence[Point], sizes: Sequence[float], front: set[int]) -> None:
    """One label per point, at the first offset that covers no marker and no earlier label."""
    renderer = ax.figure.canvas.get_renderer()
    markers = [
        _marker_box(ax, (p.memory_gb, p.quality_loss), s)
        for p, s in zip(points, sizes, strict=True)
    ]
    inside = ax.get_window_extent(renderer)
    taken: list = []
    for i, p in enumerate(points):
        best, best_cost = None, None
        for offset, ha in _OFFSETS:
            text = ax.annotate(
                p.label,
                (p.memory_gb, p.quality_loss),
                textcoords="offset points",
                xytext=offset,
                ha=ha,
                fontsize=8,
                fontweight="bold" if i in front else "normal",
            )
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            cost = sum(box.overlaps(m) for m in markers) * 10 + sum(box.overlaps(t) for t in taken)
            cost += 0 if inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1) else 5
            if best_cost is None or cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (text, box), cost
            else:
                text.remove()
            if cost == 0:
                break
        taken.append(best[1])


def pareto_figure(
    points: Sequence[Point],
    title: str,
    memory_label: str = "measured peak memory (GB)",
    quality_label: str = "perplexity Δ vs unquantized (%)",
):
    """Scatter of memory against quality loss, the front joined by a step line, decode tok/s
    as colour (grey where it was not measured); labels placed off every marker, the legend
    below the axes. The caller closes the figure."""
    points = [p for p in points if _finite(p.memory_gb) and _finite(p.quality_loss)]
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    speeds = [p.decode_tok_s for p in points if _finite(p.decode_tok_s)]
    if points:
        front = pareto_front(points)
        xs = [points[i].memory_gb for i in front]
        ys = [points[i].quality_loss for i in front]
        ax.step(
            xs, ys, where="post", color="#C44E52", linewidth=1.2, zorder=1, label="Pareto front"
        )
        scatter = None
        sizes = [90 if i in front else 50 for i in range(len(points))]
        for i, p in enumerate(points):
            colour_value = p.decode_tok_s if _finite(p.decode_tok_s) else None
            kwargs = {"s": sizes[i], "edgecolors": "black", "zorder": 2}
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
        if scatter is not None:
            fig.colorbar(scatter, ax=ax, label="decode tokens/s")
        losses = [abs(p.quality_loss) for p in points]
        if max(losses) > 100 * max(min(losses), 1.0):
            # A collapsed run (2-bit RTN: +10^6 %) would flatten the rest: log scale, linear
            # near zero where losses may be negative.
            ax.set_yscale("symlog", linthresh=1.0)
            quality_label += " (symlog)"
        ax.margins(x=0.18, y=0.15)  # room for the labels of the outermost points
        # Outside the axes (bottom left of the figure), where it can cover no point.
        fig.legend(fontsize=8, loc="lower left", frameon=False)
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
    fig.tight_layout(rect=(0, 0.05, 1, 1) if points else None)
    if points:
        fig.canvas.draw()  # the final layout, so that label boxes are where they will be drawn
        _place_labels(ax, points, sizes, set(front))
    return fig


def pareto_plot(
    points: Sequence[Point],
    path: Path,
    title: str,
    memory_label: str = "measured peak memory (GB)",
    quality_label: str = "perplexity Δ vs unquantized (%)",
) -> Path:
    """``pareto_figure`` saved as a PNG."""
    fig = pareto_figure(points, title, memory_label, quality_label)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
