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


def plot_layer_coefficients(summary: pd.DataFrame, source_names: Sequence[str], path: str | Path,
                            title: str = "MedMerge: mean coefficient of each source per layer") -> None:
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
    ax.set_title(title)
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


def plot_comparison(summary: pd.DataFrame, path: str | Path,
                    keys: Sequence[str] = ("f1_macro", "balanced_accuracy", "accuracy", "auroc_macro")) -> None:
    """One panel per metric, one horizontal bar per method (``report.summarize``) with ± std over seeds."""
    methods = list(summary["method"])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys) + 1.5, 0.32 * len(methods) + 1.3),
                             sharey=True, squeeze=False)
    y = np.arange(len(methods))[::-1]
    for ax, key in zip(axes[0], keys, strict=True):
        means, stds = summary[f"{key}_mean"].to_numpy(), summary[f"{key}_std"].to_numpy()
        bars = ax.barh(y, means, xerr=stds, capsize=2, color=plt.get_cmap("tab10")(0), alpha=0.8)
        for position, mean, std in zip(y, means, stds, strict=True):
            ax.text(min(mean + std, 1.0) + 0.01, position, f"{mean:.3f}±{std:.3f}", va="center", fontsize=6)
        bars[int(np.nanargmax(means))].set_color(plt.get_cmap("tab10")(1))
        ax.set_xlim(0, 1.25)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="x", linewidth=0.3)
    labels = [f"{m} (n={n})" for m, n in zip(methods, summary["seeds"], strict=True)]
    axes[0, 0].set_yticks(y, labels, fontsize=7)
    fig.suptitle("Target test split: mean ± std over seeds (best mean highlighted)", fontsize=10)
    _save(fig, path)


def plot_layerwise(by_method: dict[str, pd.DataFrame], source_names: Sequence[str], path: str | Path) -> None:
    """One panel per learned merge: each source's mean coefficient per layer (averaged over seeds), shaded
    ± the spread of the coefficients across the layer's kernels (``report.layerwise``)."""
    count = max(len(by_method), 1)
    fig, axes = plt.subplots(count, 1, figsize=(10, 2.6 * count), squeeze=False, sharex=False)
    for ax, (method, frame) in zip(axes[:, 0], by_method.items(), strict=False):
        x = frame["position"].to_numpy()
        for name in source_names:
            mean, spread = frame[f"{name}_mean"].to_numpy(), frame[f"{name}_kernel_std"].to_numpy()
            ax.plot(x, mean, label=name, linewidth=1.2)
            ax.fill_between(x, mean - spread, mean + spread, alpha=0.2)
        ax.axhline(1.0 / len(source_names), color="grey", linestyle=":", linewidth=0.8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("coefficient")
        ax.set_title(f"{method}: mean coefficient of each source per layer, ± std across the layer's kernels",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    if not by_method:
        axes[0, 0].text(0.5, 0.5, "no learned merge among methods", ha="center", va="center")
    axes[-1, 0].set_xlabel("layer (network order, input to output)")
    _save(fig, path)


def plot_differences(differences: Sequence[dict], path: str | Path, metric_label: str, confidence: float) -> None:
    """Each method's paired difference to the reference (``medmerge.compare``): the mean, the t interval over
    seeds (thick) and the bootstrap interval over test images (thin), coloured by verdict."""
    rows = [d for d in differences if d["verdict"] != "reference"]
    colours = {"better": "tab:green", "worse": "tab:red", "no detectable difference": "tab:grey"}
    fig, ax = plt.subplots(figsize=(8, 0.34 * max(len(rows), 1) + 1.4))
    y = np.arange(len(rows))[::-1]
    for position, row in zip(y, rows, strict=True):
        colour = colours[row["verdict"]]
        if np.isfinite(row["t_low"]):
            ax.plot([row["t_low"], row["t_high"]], [position, position], color=colour, linewidth=5, alpha=0.45)
        ax.plot([row["boot_low"], row["boot_high"]], [position, position], color=colour, linewidth=1.2)
        ax.plot(row["diff"], position, "o", color=colour, markersize=4)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, [f"{r['method']} ({r['verdict']})" for r in rows], fontsize=7)
    reference = differences[0]["reference"] if differences else "reference"
    ax.set_xlabel(f"Δ {metric_label} to {reference} (paired, mean over seeds)")
    ax.set_title(f"thick: t {confidence:.0%} over seeds · thin: bootstrap {confidence:.0%} over test images",
                 fontsize=9)
    ax.grid(axis="x", linewidth=0.3)
    _save(fig, path)
