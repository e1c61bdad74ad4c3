"""PNG figures: per-layer merge coefficients, confusion matrices, the method comparison."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from medmerge.io import atomic_file  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> None:
    with atomic_file(path) as temp:
        fig.savefig(temp, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_layer_coefficients(summary: pd.DataFrame, source_names: Sequence[str], path: str | Path) -> None:
    """Mean coefficient of each source per layer, in network order (the layer-wise transfer pattern)."""
    by_layer = summary.groupby("layer", sort=False)[list(source_names)].mean()
    fig, ax = plt.subplots(figsize=(max(8, len(by_layer) * 0.08), 4))
    x = np.arange(len(by_layer))
    for name in source_names:
        ax.plot(x, by_layer[name].to_numpy(), label=name, linewidth=1.2)
    ax.axhline(1.0 / len(source_names), color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("layer (network order, input to output)")
    ax.set_ylabel("mean coefficient")
    ax.set_ylim(0, 1)
    ax.set_title("MedMerge: mean coefficient of each source per layer")
    ax.legend()
    _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str, path: str | Path) -> None:
    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(class_names), 1.0 + 0.8 * len(class_names)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save(fig, path)


def plot_comparison(metrics: dict[str, dict[str, float]], path: str | Path,
                    keys: Sequence[str] = ("f1_macro", "balanced_accuracy", "accuracy", "auroc_macro")) -> None:
    """Grouped bars: one group per metric, one bar per method."""
    methods = list(metrics)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(keys), 4))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        values = [metrics[method].get(k, np.nan) for k in keys]
        bars = ax.bar(np.arange(len(keys)) + i * width, values, width, label=method)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(np.arange(len(keys)) + width * (len(methods) - 1) / 2, keys)
    ax.set_ylim(0, 1.15)
    ax.set_title("Target test split")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
