"""Per-layer pictures: measured sensitivity and the ``quant=auto`` bit plan, as a grid of
blocks (rows) × layer kinds within a block (columns); layers outside a numbered stack go on a
row of their own."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm  # noqa: E402

_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def layer_grid(names: list[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Row labels, column labels and each layer's cell."""
    rows: list[str] = []
    cols: list[str] = []
    cell: dict[str, tuple[str, str]] = {}
    for name in names:
        m = _BLOCK.match(name)
        row, col = (f"{m['prefix']}.{m['index']}", m["rest"]) if m else ("other", name)
        if row not in rows:
            rows.append(row)
        if col not in cols:
            cols.append(col)
        cell[name] = (row, col)
    return rows, cols, {n: (rows.index(r), cols.index(c)) for n, (r, c) in cell.items()}


def _grid(values: Mapping[str, float]) -> tuple[np.ndarray, list[str], list[str]]:
    rows, cols, cells = layer_grid(list(values))
    grid = np.full((len(rows), len(cols)), np.nan)
    for name, (r, c) in cells.items():
        grid[r, c] = values[name]
    return grid, rows, cols


def _axes(rows: list[str], cols: list[str], title: str):
    fig, ax = plt.subplots(figsize=(2 + 0.9 * len(cols), 1.5 + 0.22 * len(rows)))
    ax.set_xticks(range(len(cols)), [c.rsplit(".", 1)[-1] for c in cols], rotation=45, ha="right")
    step = max(1, len(rows) // 40)
    ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
    ax.set_title(title, fontsize=9)
    return fig, ax


def sensitivity_plot(table: Mapping[str, Mapping[str, float]], path: Path, title: str) -> Path:
    """KL divergence per layer (log colour scale)."""
    values = {n: max(float(v["kl"]), 1e-9) for n, v in table.items()}
    grid, rows, cols = _grid(values)
    fig, ax = _axes(rows, cols, title)
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max())) if finite.size else None
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="KL (nats / token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bit_plan_plot(bits: Mapping[str, int], path: Path, title: str) -> Path:
    """The bit width of every planned layer (4 / 8 / 16)."""
    grid, rows, cols = _grid({n: float(b) for n, b in bits.items()})
    fig, ax = _axes(rows, cols, title)
    cmap = ListedColormap(["#C44E52", "#DD8452", "#55A868"])
    norm = BoundaryNorm([0, 6, 12, 32], cmap.N)
    image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, ticks=[3, 9, 22])
    bar.ax.set_yticklabels(["4-bit", "8-bit", "16 (dtype)"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
