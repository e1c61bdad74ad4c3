"""The comparison that ``evaluate`` reports: which methods are compared, their predictions as their own stages
wrote them, and every method's metrics and paired difference to the reference.

Methods, in report order: ``<baseline>_<source>`` (each baseline of ``params.baselines`` for each source,
models/<baseline>/seed_<n>/<source>), ``ensemble_ft`` (the mean of the FT baselines' logits), and for each
entry of ``methods`` ``<name>_collapsed`` (models/merged/<name>/seed_<n>, before its fine-tune) and ``<name>``
(models/merged_ft/<name>/seed_<n>). The reference is the baseline with the best mean validation
``evaluate.metric`` (``medmerge.compare``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medmerge import layout
from medmerge.compare import choose_reference, family_verdicts, paired_difference, resample_weights, score
from medmerge.config import BASELINES, Params
from medmerge.io import read_json
from medmerge.methods import get_method
from medmerge.metrics import confusion_matrix, f1_per_class, reported_metrics, scalar_metrics
from medmerge.models.checkpoint import CARD_FILE
from medmerge.predictions import SplitPredictions, class_names, read_predictions
from medmerge.report import comparison_markdown, layerwise, report_header, summarize, with_differences

ENSEMBLE = "ensemble_ft"

Predictions = dict[str, dict[int, dict[str, SplitPredictions]]]  # method -> seed -> split -> predictions


@dataclass
class Evaluated:
    """One compared method: its report name, a short description, and where its predictions are per seed."""

    name: str
    kind: str
    model_dir: Callable[[int], Path] | None = None  # seed -> the model's directory
    members: tuple[str, ...] = ()  # an ensemble: the methods whose logits it averages
    baseline: bool = False  # eligible as the reference


def evaluated_methods(params: Params) -> list[Evaluated]:
    """Baselines per source first, the FT ensemble, then each merge collapsed and fine-tuned, in params
    order."""
    methods = [Evaluated(f"{baseline}_{source}", f"{BASELINES[baseline]} from {source}",
                         lambda seed, b=baseline, s=source: layout.source_dir(b, s, seed), baseline=True)
               for baseline in params.baselines for source in params.source_names]
    if "ft" in params.baselines:
        members = tuple(f"ft_{source}" for source in params.source_names)
        methods.append(Evaluated(ENSEMBLE, f"ensemble of the FT baselines ({len(members)}× inference)",
                                 members=members))
    for name in params.methods:
        settings = params.method(name)
        kind = get_method(settings.method).describe(settings)
        kind += {"weight_matching": ", weight matching", "activation_matching": ", activation matching"}.get(
            settings.align, "")
        methods.append(Evaluated(f"{name}_collapsed", f"{kind}, collapsed",
                                 lambda seed, n=name: layout.merge_dir(layout.MERGED, n, seed)))
        methods.append(Evaluated(name, f"{kind} + FT {settings.finetune_epochs} ep",
                                 lambda seed, n=name: layout.merge_dir(layout.MERGED_FT, n, seed)))
    return methods


def mean_logits(members: list[dict[str, SplitPredictions]]) -> dict[str, SplitPredictions]:
    """An ensemble's predictions on each split: the mean of its members' logits (in members order)."""
    return {split: SplitPredictions(np.mean([member[split].logits for member in members], axis=0),
                                    members[0][split].labels)
            for split in members[0]}


def gather_predictions(methods: list[Evaluated], seeds: list[int]) -> Predictions:
    """``{method: {seed: {split: predictions}}}``; an ensemble averages its members' logits."""
    gathered: Predictions = {}
    for method in methods:
        if method.members:
            gathered[method.name] = {seed: mean_logits([gathered[member][seed] for member in method.members])
                                     for seed in seeds}
        else:
            gathered[method.name] = {seed: read_predictions(method.model_dir(seed) / layout.PREDICTIONS)
                                     for seed in seeds}
    first = next(iter(gathered.values()))[seeds[0]]
    for name, by_seed in gathered.items():
        for seed, splits in by_seed.items():
            for split, predictions in splits.items():
                if not np.array_equal(predictions.labels, first[split].labels):
                    raise ValueError(f"{name} seed {seed}: its {split} labels differ from the other "
                                     "methods': were the models evaluated on different data?")
    return gathered


def trained_with(methods: list[Evaluated], seeds: list[int]) -> list[str]:
    """What the compared models were trained with, from their cards (``compute``), each description once."""
    cards = [read_json(method.model_dir(seed) / CARD_FILE) for method in methods if method.model_dir
             for seed in seeds]
    return list(dict.fromkeys(card.get("compute") or "unrecorded hardware" for card in cards))


def learned_layerwise(params: Params) -> dict[str, pd.DataFrame]:
    """For every merge whose method learns its coefficients (``medmerge``), its per-layer coefficients
    averaged over seeds."""
    result = {}
    for name in params.methods:
        if not get_method(params.method(name).method).learns_coefficients:
            continue
        summaries = {seed: pd.read_csv(layout.merge_dir(layout.MERGE, name, seed) / "layers.csv")
                     for seed in params.seeds}
        result[name] = layerwise(summaries, params.source_names)
    return result


@dataclass(frozen=True)
class Comparison:
    """Every compared method over the seeds, as reports/ holds it."""

    metric_names: tuple[str, ...]  # the scalar test metrics of the target task, in report order
    classes: list[str]
    reference: str
    per_seed: pd.DataFrame  # per_seed.csv: one row per method and seed
    summary: pd.DataFrame  # comparison.csv: one row per method, with its difference to the reference
    differences: list[dict]  # the paired difference of each method (medmerge.compare.PairedDifference)
    per_class: dict  # per_class.json: {method: {seed: {f1_per_class, confusion_matrix}}}
    metrics_json: dict  # metrics.json: {method: {metric, metric_std, <metric>_diff, ..., verdict}}
    layers: dict[str, pd.DataFrame]  # the learned merges' per-layer coefficients
    header: str  # what the table shows, what the models were trained with, what each interval covers
    table: str  # the Markdown table of summary

    @property
    def markdown(self) -> str:
        """comparison.md."""
        return self.header + self.table

    @property
    def layerwise_table(self) -> pd.DataFrame:
        """layerwise.csv: every learned merge's per-layer coefficients, with a ``method`` column."""
        frames = [frame.assign(method=name) for name, frame in self.layers.items()]
        return pd.concat(frames or [pd.DataFrame()], ignore_index=True)


def _metrics_json(summary: pd.DataFrame, metrics: tuple[str, ...], compared: str) -> dict:
    """metrics.json: each method's mean and std of every metric, its difference in ``compared`` to the
    reference with both intervals, and its verdict."""
    result = {}
    for row in summary.to_dict("records"):
        values = {**{k: row[f"{k}_mean"] for k in metrics}, **{f"{k}_std": row[f"{k}_std"] for k in metrics}}
        values.update({f"{compared}_{key}": row[column] for key, column in
                       (("diff", "diff"), ("ci_low", "t_low"), ("ci_high", "t_high"),
                        ("boot_low", "boot_low"), ("boot_high", "boot_high"), ("p_holm", "p_holm"))})
        result[row["method"]] = {**values, "verdict": row["verdict"]}
    return result


def compare_methods(params: Params) -> Comparison:
    """Every method of :func:`evaluated_methods` over ``params.seeds`` on the test split, each paired with the
    reference (``params.evaluate``: metric, bootstrap, confidence)."""
    settings, seeds = params.evaluate, params.seeds
    metrics = reported_metrics(params.data.datasets[params.data.target].ordinal)
    methods = evaluated_methods(params)
    predictions = gather_predictions(methods, seeds)
    first_dir = next(m for m in methods if m.model_dir).model_dir(seeds[0])
    classes = class_names(first_dir / layout.PREDICTIONS)
    test_labels = predictions[methods[0].name][seeds[0]]["test"].labels
    rows, per_class = [], {}
    for method in methods:
        for seed in seeds:
            test, val = predictions[method.name][seed]["test"], predictions[method.name][seed]["val"]
            result = scalar_metrics(test.labels, test.probabilities, metrics)
            confusion = confusion_matrix(test.labels, test.predicted, len(classes))
            val_score = score(val.labels, val.predicted, len(classes), settings.metric)
            rows.append({"method": method.name, "kind": method.kind, "seed": seed, **result,
                         f"val_{settings.metric}": val_score})
            per_class.setdefault(method.name, {})[str(seed)] = {
                "f1_per_class": dict(zip(classes, map(float, f1_per_class(confusion)), strict=True)),
                "confusion_matrix": confusion.tolist()}
    per_seed = pd.DataFrame(rows)
    validation = per_seed.groupby("method", sort=False)[f"val_{settings.metric}"].mean()
    reference = choose_reference(validation, [m.name for m in methods if m.baseline])
    weights = resample_weights(len(test_labels), settings.bootstrap, settings.bootstrap_seed)
    predicted = {name: {seed: splits["test"].predicted for seed, splits in by_seed.items()}
                 for name, by_seed in predictions.items()}
    differences = [d.as_dict() for d in family_verdicts(
        [paired_difference(m.name, predicted[m.name], reference, predicted[reference], test_labels, len(classes),
                           settings.metric, weights, settings.confidence) for m in methods], settings.confidence)]
    summary = with_differences(summarize(per_seed, metrics), differences)
    layers = learned_layerwise(params)
    given = [name for name, source in params.sources.items() if source.task is None]
    header = report_header(params.data.target, seeds, reference, float(validation[reference]),
                           settings.metric, settings.confidence, settings.bootstrap, len(test_labels), given,
                           trained_with(methods, seeds))
    table = comparison_markdown(summary, metrics, settings.metric, settings.confidence)
    return Comparison(metrics, classes, reference, per_seed, summary, differences, per_class,
                      _metrics_json(summary, metrics, settings.metric), layers, header, table)
