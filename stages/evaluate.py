"""Stage evaluate: every method and seed, compared with the reference -> reports/ and the MLflow summary run.

Reads the predictions.csv that each model's own stage wrote (validation and test logits; nothing is run
again) and models/merge/<method>/seed_<n>/layers.csv. Methods: ``<baseline>_<source>``
(models/<ft|lpft>/seed_<n>/<source>), ``ensemble_ft`` (the mean of the FT baselines' logits, N× the
inference cost), and for each entry of ``methods`` ``<name>_collapsed`` (models/merged/<name>/seed_<n>,
before its fine-tune) and ``<name>`` (models/merged_ft/<name>/seed_<n>).

The reference is the baseline with the best mean validation ``evaluate.metric``; every method gets its
paired difference to it with a t interval over seeds, a paired bootstrap interval over test images and a
verdict (``medmerge.compare``). Writes to reports/: comparison.md and comparison.csv, per_seed.csv,
metrics.json (DVC metrics: ``{method: {metric, metric_std, <metric>_diff, _ci_low, _ci_high, _boot_low,
_boot_high, verdict}}``), per_class.json, comparison.png, differences.png, layerwise.png + layerwise.csv
and confusion/<method>.png (first seed). MLflow: one ``evaluate`` run with every number and the reports
as artifacts, and one nested run per method with its per-seed test metrics (step = seed).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medmerge import layout
from medmerge.compare import choose_reference, paired_difference, resample_weights, score
from medmerge.config import Params
from medmerge.data.prepare import load_split
from medmerge.io import atomic_directory, read_json, write_json
from medmerge.methods import get_method
from medmerge.metrics import confusion_matrix, reported_metrics, scalar_metrics
from medmerge.model_registry import best_model, register_best_model
from medmerge.models.checkpoint import CARD_FILE
from medmerge.plots import plot_comparison, plot_confusion, plot_differences, plot_layerwise
from medmerge.predictions import SplitPredictions, class_names, read_predictions
from medmerge.report import (
    HEADERS,
    comparison_markdown,
    layerwise,
    report_header,
    summarize,
    with_differences,
)
from medmerge.stage import run, stage_params
from medmerge.tracking import stage_run

log = logging.getLogger("medmerge.stages.evaluate")
BASELINE_KINDS = {"ft": "FT", "lpft": "LP-FT"}
ENSEMBLE = "ensemble_ft"


@dataclass
class Evaluated:
    """One compared method: its report name, a short description, and where its predictions are per seed."""

    name: str
    kind: str
    model_dir: Callable[[int], Path] | None = None  # seed -> the model's directory
    members: tuple[str, ...] = ()  # an ensemble: the methods whose logits it averages
    baseline: bool = False  # eligible as the reference


def evaluated_methods(params: Params) -> list[Evaluated]:
    """Baselines per source first, the FT ensemble, then each merge collapsed and fine-tuned, in params order."""
    methods = [Evaluated(f"{baseline}_{source}", f"{BASELINE_KINDS[baseline]} from {source}",
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


def gather_predictions(methods: list[Evaluated], seeds: list[int]) -> dict[str, dict[int, dict[str, SplitPredictions]]]:
    """``{method: {seed: {split: predictions}}}``; an ensemble averages its members' logits."""
    gathered: dict[str, dict[int, dict[str, SplitPredictions]]] = {}
    for method in methods:
        if method.members:
            gathered[method.name] = {
                seed: {split: SplitPredictions(np.mean([gathered[m][seed][split].logits for m in method.members], axis=0),
                                               gathered[method.members[0]][seed][split].labels)
                       for split in gathered[method.members[0]][seed]}
                for seed in seeds}
        else:
            gathered[method.name] = {seed: read_predictions(method.model_dir(seed) / layout.PREDICTIONS)
                                     for seed in seeds}
    first = next(iter(gathered.values()))[seeds[0]]
    for name, by_seed in gathered.items():
        for seed, splits in by_seed.items():
            for split, predictions in splits.items():
                if not np.array_equal(predictions.labels, first[split].labels):
                    raise ValueError(f"{name} seed {seed}: its {split} labels differ from the other methods': "
                                     "were the models evaluated on different data?")
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


def main() -> None:
    params, flat = stage_params()
    settings, seeds = params.evaluate, params.seeds
    scalars = reported_metrics(params.data.datasets[params.data.target].ordinal)
    methods = evaluated_methods(params)
    predictions = gather_predictions(methods, seeds)
    first_dir = next(m for m in methods if m.model_dir).model_dir(seeds[0])
    classes = class_names(first_dir / layout.PREDICTIONS)
    test_labels = predictions[methods[0].name][seeds[0]]["test"].labels
    rows, details = [], {}
    for method in methods:
        for seed in seeds:
            test, val = predictions[method.name][seed]["test"], predictions[method.name][seed]["val"]
            result = scalar_metrics(test.labels, test.probabilities, scalars)
            confusion = confusion_matrix(test.labels, test.predicted, len(classes))
            val_score = score(val.labels, val.predicted, len(classes), settings.metric)
            rows.append({"method": method.name, "kind": method.kind, "seed": seed, **result,
                         f"val_{settings.metric}": val_score})
            per_class = [2 * confusion[k, k] / max(confusion[k].sum() + confusion[:, k].sum(), 1)
                         for k in range(len(classes))]
            details.setdefault(method.name, {})[str(seed)] = {
                "f1_per_class": dict(zip(classes, map(float, per_class), strict=True)),
                "confusion_matrix": confusion.tolist()}
    per_seed = pd.DataFrame(rows)
    validation = per_seed.groupby("method", sort=False)[f"val_{settings.metric}"].mean()
    reference = choose_reference(validation, [m.name for m in methods if m.baseline])
    weights = resample_weights(len(test_labels), settings.bootstrap, settings.bootstrap_seed)
    predicted = {name: {seed: splits["test"].predicted for seed, splits in by_seed.items()}
                 for name, by_seed in predictions.items()}
    differences = [paired_difference(m.name, predicted[m.name], reference, predicted[reference], test_labels,
                                     len(classes), settings.metric, weights, settings.confidence).as_dict()
                   for m in methods]
    summary = with_differences(summarize(per_seed, scalars), differences)
    layers = learned_layerwise(params)
    metrics = {}
    for row in summary.to_dict("records"):
        values = {**{k: row[f"{k}_mean"] for k in scalars}, **{f"{k}_std": row[f"{k}_std"] for k in scalars}}
        values.update({f"{settings.metric}_{key}": row[column] for key, column in
                       (("diff", "diff"), ("ci_low", "t_low"), ("ci_high", "t_high"), ("boot_low", "boot_low"),
                        ("boot_high", "boot_high"))})
        metrics[row["method"]] = {**values, "verdict": row["verdict"]}
    given = [name for name, source in params.sources.items() if source.task is None]
    header = report_header(params.data.target, seeds, reference, float(validation[reference]), settings.metric,
                           settings.confidence, settings.bootstrap, len(test_labels), given,
                           trained_with(methods, seeds))
    table = comparison_markdown(summary, scalars, settings.metric, settings.confidence)
    with atomic_directory(layout.REPORTS) as out:
        write_json(out / "metrics.json", metrics)
        write_json(out / "per_class.json", details)
        per_seed.to_csv(out / "per_seed.csv", index=False)
        summary.to_csv(out / "comparison.csv", index=False)
        (out / "comparison.md").write_text(header + table)
        plot_comparison(summary, out / "comparison.png", keys=scalars)
        plot_differences(differences, out / "differences.png", HEADERS[settings.metric], settings.confidence)
        plot_layerwise(layers, params.source_names, out / "layerwise.png")
        pd.concat([frame.assign(method=name) for name, frame in layers.items()] or [pd.DataFrame()],
                  ignore_index=True).to_csv(out / "layerwise.csv", index=False)
        first = str(seeds[0])
        for name, by_seed in details.items():
            plot_confusion(by_seed[first]["confusion_matrix"], classes, f"{name} (seed {first})",
                           out / "confusion" / f"{name}.png")
    log.info("comparison (test, over seeds %s):\n%s", seeds, table)
    with stage_run("evaluate", params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                   run_name="evaluate", tags={"summary": "true", "reference": reference}) as tracker:
        tracker.log_metrics({f"{m}.{k}": v for m, values in metrics.items() for k, v in values.items()
                             if not isinstance(v, str)})
        tracker.log_artifacts(layout.REPORTS, artifact_path="reports")
        for row in summary.to_dict("records"):
            with tracker.child(row["method"], tags={"stage": "evaluate_method", "method": row["method"],
                                                    "kind": row["kind"], "verdict": row["verdict"],
                                                    "summary": "false"}) as child:
                for seed_row in per_seed[per_seed["method"] == row["method"]].to_dict("records"):
                    child.log_metrics({k: seed_row[k] for k in scalars}, step=int(seed_row["seed"]))
                child.log_metrics({f"{k}_mean": row[f"{k}_mean"] for k in scalars})
                child.log_metrics({f"{k}_std": row[f"{k}_std"] for k in scalars})
                if row["verdict"] != "reference":
                    child.log_metrics({f"{settings.metric}_diff": row["diff"],
                                       f"{settings.metric}_ci_low": row["t_low"],
                                       f"{settings.metric}_ci_high": row["t_high"],
                                       f"{settings.metric}_boot_low": row["boot_low"],
                                       f"{settings.metric}_boot_high": row["boot_high"]})
        target_dir = layout.processed_dir(params.data.target)
        tracker.log_dataset(target_dir, params.data.target, {"test": "testing"})
        if params.mlflow.registered_model:  # the merged model that beats the reference, else the best validated
            merges = [name for name in params.methods if metrics[name]["verdict"] == "better"] or list(params.methods)
            best, seed = best_model(per_seed, merges, metric=f"val_{settings.metric}")
            register_best_model(layout.merge_dir(layout.MERGED_FT, best, seed), method=best, seed=seed,
                                metrics=metrics[best], registered_name=params.mlflow.registered_model,
                                input_example=load_split(target_dir, "test")[0][:1])


if __name__ == "__main__":
    run(main)
