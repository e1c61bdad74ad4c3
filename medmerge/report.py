"""The comparison report: every method's test metrics per seed, summarised as mean ± std.

``per_seed`` is a long table (one row per method and seed); :func:`summarize` gives one row per method
with ``<metric>_mean`` and ``<metric>_std`` (sample standard deviation over seeds, ``ddof=1``; 0 for a
single seed, which the table marks as ``n=1``). :func:`layerwise` averages the learned coefficients per
layer over seeds (the paper's layer-wise transfer pattern).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

SCALARS = ("f1_macro", "accuracy", "balanced_accuracy", "auroc_macro")
HEADERS = {"f1_macro": "macro F1", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
           "auroc_macro": "macro AUROC"}


def summarize(per_seed: pd.DataFrame, metrics: Sequence[str] = SCALARS) -> pd.DataFrame:
    """One row per method (in first-seen order): ``kind``, ``seeds``, and mean / std of every metric."""
    order = list(dict.fromkeys(per_seed["method"]))
    grouped = per_seed.groupby("method", sort=False)
    summary = pd.DataFrame({"method": order})
    summary["kind"] = [grouped.get_group(m)["kind"].iloc[0] for m in order]
    summary["seeds"] = [int(grouped.get_group(m)["seed"].nunique()) for m in order]
    for metric in metrics:
        values = grouped[metric]
        summary[f"{metric}_mean"] = [float(values.get_group(m).mean()) for m in order]
        summary[f"{metric}_std"] = [float(values.get_group(m).std(ddof=1)) if len(values.get_group(m)) > 1 else 0.0
                                    for m in order]
    return summary


def comparison_markdown(summary: pd.DataFrame, metrics: Sequence[str] = SCALARS) -> str:
    """A Markdown table of ``summary``: ``mean ± std`` per metric, the best mean per metric in bold."""
    best = {metric: summary[f"{metric}_mean"].max() for metric in metrics}
    header = ["method", "kind", "seeds", *(HEADERS.get(m, m) for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.itertuples(index=False):
        cells = [row.method, row.kind, str(row.seeds)]
        for metric in metrics:
            mean, std = getattr(row, f"{metric}_mean"), getattr(row, f"{metric}_std")
            cell = f"{mean:.3f} ± {std:.3f}"
            cells.append(f"**{cell}**" if mean == best[metric] else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def layerwise(summaries: Mapping[int, pd.DataFrame], source_names: Sequence[str]) -> pd.DataFrame:
    """Per layer (network order) and source: the mean coefficient averaged over seeds (``<source>_mean``),
    its standard deviation over seeds (``<source>_seed_std``) and the spread of the coefficients across the
    layer's kernels, averaged over seeds (``<source>_kernel_std``, 0 where a summary has no ``_std``).

    ``summaries`` maps a seed to that seed's ``KernelMerge.layer_summary()`` (``layers.csv``).
    """
    frames = []
    for seed, summary in summaries.items():
        summary = summary.copy()
        for source in source_names:
            if f"{source}_std" not in summary:
                summary[f"{source}_std"] = 0.0
        columns = [*source_names, *(f"{source}_std" for source in source_names)]
        by_layer = summary.groupby("layer", sort=False)[columns].mean().reset_index()
        by_layer["position"] = range(len(by_layer))
        by_layer["seed"] = seed
        frames.append(by_layer)
    grouped = pd.concat(frames, ignore_index=True).groupby(["position", "layer"], sort=True)
    result = pd.DataFrame(index=grouped.size().index)
    for source in source_names:
        result[f"{source}_mean"] = grouped[source].mean()
        result[f"{source}_seed_std"] = grouped[source].std(ddof=1)
        result[f"{source}_kernel_std"] = grouped[f"{source}_std"].mean()
    return result.reset_index().fillna(0.0)
