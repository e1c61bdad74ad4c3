"""Stage evaluate: every method on the target test split -> reports/ and the MLflow summary run.

Methods: ft_<source> (models/finetuned/<source>), medmerge_collapsed (models/merged, before its
fine-tune) and medmerge (models/merged_ft). Writes reports/metrics.json ({method: {f1_macro, ...}}),
reports/per_class.json, reports/comparison.png and reports/confusion/<method>.png.
"""

import logging

from medmerge import layout
from medmerge.io import atomic_directory, write_json
from medmerge.models import create_model, load_model_dir
from medmerge.pipeline import test_metrics
from medmerge.plots import plot_comparison, plot_confusion
from medmerge.stage import run, seed_everything, stage_dataset, stage_params, stage_runtime
from medmerge.tracking import stage_run

log = logging.getLogger("medmerge.stages.evaluate")
SCALARS = ("f1_macro", "accuracy", "balanced_accuracy", "auroc_macro")


def method_dirs(source_names):
    dirs = {f"ft_{name}": layout.FINETUNED / name for name in source_names}
    dirs["medmerge_collapsed"] = layout.MERGED
    dirs["medmerge"] = layout.MERGED_FT
    return dirs


def main() -> None:
    params, flat = stage_params()
    seed_everything(params.data.seed)
    runtime = stage_runtime(params)
    data = stage_dataset(params, params.data.target, params.evaluate.batch_size, runtime)
    results = {}
    for method, model_dir in method_dirs(params.source_names).items():
        state, card = load_model_dir(model_dir)
        model = create_model(card["arch"], num_classes=card["num_classes"])
        model.load_state_dict(state, strict=True)
        results[method] = test_metrics(model, card["arch"], data, runtime)
        log.info("%-20s test macro F1 %.4f  accuracy %.4f", method, results[method]["f1_macro"],
                 results[method]["accuracy"])
    scalars = {m: {k: r[k] for k in SCALARS} for m, r in results.items()}
    with atomic_directory(layout.REPORTS) as out:
        write_json(out / "metrics.json", scalars)
        write_json(out / "per_class.json", {m: {"f1_per_class": r["f1_per_class"],
                                                  "confusion_matrix": r["confusion_matrix"]} for m, r in results.items()})
        plot_comparison(scalars, out / "comparison.png")
        for method, result in results.items():
            plot_confusion(result["confusion_matrix"], data.classes, method, out / "confusion" / f"{method}.png")
    with stage_run("evaluate", params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                   run_name="evaluate", tags={"summary": "true"}) as tracker:
        tracker.log_metrics({f"{m}.{k}": v for m, values in scalars.items() for k, v in values.items()})
        tracker.log_metrics({f"{m}.f1.{c}": v for m, r in results.items() for c, v in r["f1_per_class"].items()})
        tracker.log_artifacts(layout.REPORTS, artifact_path="reports")


if __name__ == "__main__":
    run(main)
