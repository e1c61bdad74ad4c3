"""The comparison report: every method's test metrics per seed, summarised as mean ± std, with the paired
difference to the reference and its verdict.

``per_seed`` is a long table (one row per method and seed); :func:`summarize` gives one row per method
with ``<metric>_mean`` and ``<metric>_std`` (sample standard deviation over seeds, ``ddof=1``; 0 for a
single seed). :func:`with_differences` adds the columns of ``medmerge.compare``; :func:`comparison_markdown`
renders the table and :func:`report_header` says what its intervals cover. :func:`layerwise` averages the
learned coefficients per layer over seeds (the paper's layer-wise transfer pattern).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pandas as pd

from medmerge.metrics import REPORTED_METRICS

SCALARS = REPORTED_METRICS
HEADERS = {"f1_macro": "macro F1", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
           "auroc_macro": "macro AUROC", "kappa_quadratic": "quadratic kappa"}
DIFFERENCE_COLUMNS = ("diff", "t_low", "t_high", "boot_low", "boot_high", "p_holm", "verdict")


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


def with_differences(summary: pd.DataFrame, differences: Sequence[Mapping]) -> pd.DataFrame:
    """``summary`` with the paired difference of each method to the reference (``medmerge.compare``)."""
    table = pd.DataFrame([{k: d[k] for k in ("method", *DIFFERENCE_COLUMNS)} for d in differences])
    return summary.merge(table, on="method", how="left")


def _p_value(p: float | None) -> str:
    return "—" if p is None or pd.isna(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _interval(low: float, high: float) -> str:
    return "—" if pd.isna(low) or pd.isna(high) else f"[{low:+.3f}, {high:+.3f}]"


def comparison_markdown(summary: pd.DataFrame, metrics: Sequence[str] = SCALARS, compared: str | None = None,
                        confidence: float = 0.95) -> str:
    """A Markdown table of ``summary``: ``mean ± std`` per metric, the best mean per metric in bold, and (for
    a summary :func:`with_differences`) the difference in ``compared`` to the reference with both intervals
    and the verdict."""
    best = {metric: summary[f"{metric}_mean"].max() for metric in metrics}
    header = ["method", "kind", "seeds", *(HEADERS.get(m, m) for m in metrics)]
    paired = compared is not None and "verdict" in summary
    level = f"{confidence:.0%}"
    if paired:
        header += [f"Δ {HEADERS.get(compared, compared)}", f"t {level}", f"bootstrap {level}", "p (Holm)", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.to_dict("records"):
        cells = [row["method"], row["kind"], str(row["seeds"])]
        for metric in metrics:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            cell = f"{mean:.3f} ± {std:.3f}"
            cells.append(f"**{cell}**" if mean == best[metric] else cell)
        if paired:
            if row["verdict"] == "reference":
                cells += ["—", "—", "—", "—", "reference"]
            else:
                cells += [f"{row['diff']:+.3f}", _interval(row["t_low"], row["t_high"]),
                          _interval(row["boot_low"], row["boot_high"]), _p_value(row.get("p_holm")), row["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def hardware_sentence(computes: Sequence[str]) -> str:
    """What the models were trained with (their cards' ``compute``), and what that means on another machine."""
    if not computes:
        return ""
    if all(c.startswith(("portable", "native")) for c in computes):
        return (f" Every model was trained with {' and '.join(computes)}: the same CPU model with the same kernels, "
                "threads and library versions trains the same bits, so there this table is reproduced exactly; "
                "another CPU (even of the same instruction set) or a GPU rounds differently, which moves the "
                "results as another training run would (the t interval covers that), and a verdict near the "
                "edge of its interval may then read otherwise.")
    return (f" Models were trained with {'; '.join(computes)}: other hardware rounds differently, which moves the "
            "results as another training run would (the t interval covers that).")


def report_header(target: str, seeds: Sequence[int], reference: str, reference_val: float, metric: str,
                  confidence: float, resamples: int, test_images: int, sources_as_given: Sequence[str] = (),
                  computes: Sequence[str] = ()) -> str:
    """What the table shows, what it was trained with, and what each interval covers, in words."""
    name = HEADERS.get(metric, metric)
    given = (f" Sources used as given ({', '.join(sources_as_given)}) are the same in every seed, so no "
             "interval covers how they were made." if sources_as_given else "")
    return (
        f"Target `{target}`, test split ({test_images} images), seeds {', '.join(map(str, seeds))}. Each seed "
        "reruns everything the pipeline trains: the sources' pretraining, every baseline, every merge and its "
        f"fine-tune.{given}{hardware_sentence(computes)} Metrics: mean ± sample std over seeds; best mean per "
        "column in bold.\n\n"
        f"Reference: `{reference}`, the single-source baseline with the best mean validation {name} "
        f"({reference_val:.3f}). Every method is compared with it paired, on the same seed and the same test "
        f"images: Δ is the mean over seeds of the per-seed difference in {name}; **t {confidence:.0%}** is "
        "Student's t interval over the seeds (it covers training randomness: pretraining, target-side training, "
        f"merging); **bootstrap {confidence:.0%}** is the percentile interval of the mean difference over "
        f"{resamples} paired resamples of the test images (it covers the sampling of the test set). Verdict: "
        "`better` or `worse` when both intervals exclude zero on that side and the comparison survives Holm's "
        "step-down correction over every comparison in this table (p (Holm): the larger of the t test's and "
        f"the bootstrap's two-sided p-values, Holm-adjusted; within {1 - confidence:.2f}), so the chance of any "
        "false verdict in the whole table stays below that; else `no detectable difference`."
        "\n\n"
    )


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


RESULTS_MARK = "<!-- results: generated from {source} by scripts/readme_results.py; do not edit -->"
DEFAULT_REPORT = "reports/comparison.md"
RESULTS_BEGIN = RESULTS_MARK.format(source=DEFAULT_REPORT)
RESULTS_END = "<!-- /results -->"
_RESULTS_SOURCE = re.compile(re.escape(RESULTS_MARK).replace(re.escape("{source}"), r"(\S+)"))


def results_sources(document: str) -> list[str]:
    """The report files (paths relative to the repository) whose results blocks ``document`` holds."""
    return _RESULTS_SOURCE.findall(document)


def with_results_block(document: str, report: str, source: str = DEFAULT_REPORT) -> str:
    """``document`` with the text of its results block of ``source`` replaced by ``report``."""
    begin = RESULTS_MARK.format(source=source)
    start = document.find(begin)
    end = document.find(RESULTS_END, start)
    if start < 0 or end < start:
        raise ValueError(f"no results block: expected a line {begin!r} and, after it, {RESULTS_END!r}")
    return document[: start + len(begin)] + "\n" + report.rstrip("\n") + "\n" + document[end:]
