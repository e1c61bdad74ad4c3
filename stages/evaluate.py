"""Stage evaluate: every method and seed, compared with the reference -> reports/ and the MLflow summary run.

Reads the predictions.csv that each model's own stage wrote (validation and test logits; nothing is run
again) and models/merge/<method>/seed_<n>/layers.csv; the compared methods and the comparison are
``medmerge.evaluation``'s. Writes to reports/: comparison.md and comparison.csv, per_seed.csv, metrics.json
(DVC metrics: ``{method: {metric, metric_std, <metric>_diff, _ci_low, _ci_high, _boot_low, _boot_high,
verdict}}``), per_class.json, comparison.png, differences.png, layerwise.png + layerwise.csv and
confusion/<method>.png (first seed). MLflow: one ``evaluate`` run with every number and the reports as
artifacts, and one nested run per method with its per-seed test metrics (step = seed).
"""

import logging
from pathlib import Path

from medmerge import layout
from medmerge.config import Params
from medmerge.data.prepare import load_split
from medmerge.evaluation import Comparison, compare_methods
from medmerge.io import atomic_directory, write_json
from medmerge.model_registry import best_model, register_best_model
from medmerge.plots import plot_comparison, plot_confusion, plot_differences, plot_layerwise
from medmerge.report import HEADERS
from medmerge.stage import run, stage_params
from medmerge.tracking import SUMMARY_STAGE, stage_run

log = logging.getLogger("medmerge.stages.evaluate")


def write_reports(comparison: Comparison, params: Params, out: Path) -> None:
    """reports/'s files and plots."""
    settings, first = params.evaluate, str(params.seeds[0])
    write_json(out / "metrics.json", comparison.metrics_json)
    write_json(out / "per_class.json", comparison.per_class)
    comparison.per_seed.to_csv(out / "per_seed.csv", index=False)
    comparison.summary.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(comparison.markdown)
    plot_comparison(comparison.summary, out / "comparison.png", keys=comparison.metric_names)
    plot_differences(comparison.differences, out / "differences.png", HEADERS[settings.metric],
                     settings.confidence)
    plot_layerwise(comparison.layers, params.source_names, out / "layerwise.png")
    comparison.layerwise_table.to_csv(out / "layerwise.csv", index=False)
    for name, by_seed in comparison.per_class.items():
        plot_confusion(by_seed[first]["confusion_matrix"], comparison.classes, f"{name} (seed {first})",
                       out / "confusion" / f"{name}.png")


def log_to_mlflow(comparison: Comparison, params: Params, flat: dict) -> None:
    """The ``evaluate`` run (every number, reports/ as artifacts), a nested run per method, and the merged
    model that beats the reference (else the best validated) in the Model Registry."""
    metric, metrics, per_seed = params.evaluate.metric, comparison.metrics_json, comparison.per_seed
    names = comparison.metric_names
    tags = {"summary": "true", "reference": comparison.reference}
    with stage_run(SUMMARY_STAGE, params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                   run_name=SUMMARY_STAGE, tags=tags) as tracker:
        tracker.log_metrics({f"{m}.{k}": v for m, values in metrics.items() for k, v in values.items()
                             if not isinstance(v, str)})
        tracker.log_artifacts(layout.REPORTS, artifact_path="reports")
        for row in comparison.summary.to_dict("records"):
            with tracker.child(row["method"], tags={"stage": "evaluate_method", "method": row["method"],
                                                    "kind": row["kind"], "verdict": row["verdict"],
                                                    "summary": "false"}) as child:
                for seed_row in per_seed[per_seed["method"] == row["method"]].to_dict("records"):
                    child.log_metrics({k: seed_row[k] for k in names}, step=int(seed_row["seed"]))
                child.log_metrics({f"{k}_mean": row[f"{k}_mean"] for k in names})
                child.log_metrics({f"{k}_std": row[f"{k}_std"] for k in names})
                if row["verdict"] != "reference":
                    child.log_metrics({f"{metric}_diff": row["diff"], f"{metric}_ci_low": row["t_low"],
                                       f"{metric}_ci_high": row["t_high"],
                                       f"{metric}_boot_low": row["boot_low"],
                                       f"{metric}_boot_high": row["boot_high"]})
        target_dir = layout.processed_dir(params.data.target)
        tracker.log_dataset(target_dir, params.data.target, {"test": "testing"})
        if params.mlflow.registered_model:
            merges = [name for name in params.methods if metrics[name]["verdict"] == "better"]
            best, seed = best_model(per_seed, merges or list(params.methods), metric=f"val_{metric}")
            register_best_model(layout.merge_dir(layout.MERGED_FT, best, seed), method=best, seed=seed,
                                metrics=metrics[best], registered_name=params.mlflow.registered_model,
                                input_example=load_split(target_dir, "test")[0][:1])


def main() -> None:
    params, flat = stage_params()
    comparison = compare_methods(params)
    with atomic_directory(layout.REPORTS) as out:
        write_reports(comparison, params, out)
    log.info("comparison (test, over seeds %s):\n%s", params.seeds, comparison.table)
    log_to_mlflow(comparison, params, flat)


if __name__ == "__main__":
    run(main)
