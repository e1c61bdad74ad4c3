"""Stage evaluate: every method and seed on the target test split -> reports/ and the MLflow summary run.

Methods: ``<baseline>_<source>`` (models/<ft|lpft>/<source>/seed_<n>), and for each entry of ``methods``
``<name>_collapsed`` (models/merged/<name>/seed_<n>, before its fine-tune) and ``<name>``
(models/merged_ft/<name>/seed_<n>). Writes to reports/: comparison.md and comparison.csv (mean ± std over
seeds), per_seed.csv, metrics.json ({method: {metric: mean, metric_std: std}}), per_class.json,
comparison.png, layerwise.png + layerwise.csv (learned coefficients per layer, from models/merge/) and
confusion/<method>.png (first seed). MLflow: one ``evaluate`` run with every mean and std and the reports
as artifacts, and one nested run per method with its per-seed test metrics (step = seed).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medmerge import layout
from medmerge.config import Params
from medmerge.io import atomic_directory, write_json
from medmerge.models import create_model, load_model_dir
from medmerge.pipeline import test_metrics
from medmerge.plots import plot_comparison, plot_confusion, plot_layerwise
from medmerge.registry import best_model, register_best_model
from medmerge.report import SCALARS, comparison_markdown, layerwise, summarize
from medmerge.stage import run, seed_everything, stage_dataset, stage_params, stage_runtime
from medmerge.tracking import stage_run

log = logging.getLogger("medmerge.stages.evaluate")
BASELINE_KINDS = {"ft": "FT", "lpft": "LP-FT"}


@dataclass
class Evaluated:
    """One compared method: its report name, a short description and its model directory per seed."""

    name: str
    kind: str
    model_dir: Path  # holds seed_<n>/


def evaluated_methods(params: Params) -> list[Evaluated]:
    """Baselines per source first, then each merge collapsed and fine-tuned, in params order."""
    methods = [Evaluated(f"{baseline}_{source}", f"{BASELINE_KINDS[baseline]} from {source}",
                         layout.BASELINES[baseline] / source)
               for baseline in params.baselines for source in params.source_names]
    for name in params.methods:
        settings = params.method(name)
        kind = settings.method + (f" ({settings.granularity})" if settings.method == "medmerge" else "")
        kind += ", weight matching" if settings.align == "weight_matching" else ""
        methods.append(Evaluated(f"{name}_collapsed", f"{kind}, collapsed", layout.MERGED / name))
        methods.append(Evaluated(name, f"{kind} + FT {settings.finetune_epochs} ep", layout.MERGED_FT / name))
    return methods


def learned_layerwise(params: Params) -> dict[str, pd.DataFrame]:
    """For every learned merge (``medmerge``), its per-layer coefficients averaged over seeds."""
    result = {}
    for name in params.methods:
        if params.method(name).method != "medmerge":
            continue
        summaries = {seed: pd.read_csv(layout.seed_dir(layout.MERGE / name, seed) / "layers.csv")
                     for seed in params.seeds}
        result[name] = layerwise(summaries, params.source_names)
    return result


def main() -> None:
    params, flat = stage_params()
    seed_everything(params.data.seed)
    runtime = stage_runtime(params)
    data = stage_dataset(params, params.data.target, params.evaluate.batch_size, runtime)
    rows, details = [], {}
    for method in evaluated_methods(params):
        for seed in params.seeds:
            state, card = load_model_dir(layout.seed_dir(method.model_dir, seed))
            model = create_model(card["arch"], num_classes=card["num_classes"])
            model.load_state_dict(state, strict=True)
            result = test_metrics(model, card["arch"], data, runtime)
            rows.append({"method": method.name, "kind": method.kind, "seed": seed,
                         **{k: result[k] for k in SCALARS}})
            details.setdefault(method.name, {})[str(seed)] = {
                "f1_per_class": result["f1_per_class"], "confusion_matrix": result["confusion_matrix"]}
            log.info("%-28s seed %d: test macro F1 %.4f  accuracy %.4f", method.name, seed, result["f1_macro"],
                     result["accuracy"])
    per_seed = pd.DataFrame(rows)
    summary = summarize(per_seed)
    layers = learned_layerwise(params)
    metrics = {row["method"]: {**{k: row[f"{k}_mean"] for k in SCALARS}, **{f"{k}_std": row[f"{k}_std"] for k in SCALARS}}
               for row in summary.to_dict("records")}
    with atomic_directory(layout.REPORTS) as out:
        write_json(out / "metrics.json", metrics)
        write_json(out / "per_class.json", details)
        per_seed.to_csv(out / "per_seed.csv", index=False)
        summary.to_csv(out / "comparison.csv", index=False)
        (out / "comparison.md").write_text(
            f"Target `{params.data.target}`, test split, mean ± std over seeds {params.seeds} "
            "(sample std). Best mean per column in bold.\n\n" + comparison_markdown(summary))
        plot_comparison(summary, out / "comparison.png")
        plot_layerwise(layers, params.source_names, out / "layerwise.png")
        pd.concat([frame.assign(method=name) for name, frame in layers.items()] or [pd.DataFrame()],
                  ignore_index=True).to_csv(out / "layerwise.csv", index=False)
        first = str(params.seeds[0])
        for name, by_seed in details.items():
            plot_confusion(by_seed[first]["confusion_matrix"], data.classes, f"{name} (seed {first})",
                           out / "confusion" / f"{name}.png")
    log.info("comparison (test, mean ± std over seeds %s):\n%s", params.seeds, comparison_markdown(summary))
    with stage_run("evaluate", params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                   run_name="evaluate", tags={"summary": "true"}) as tracker:
        tracker.log_metrics({f"{m}.{k}": v for m, values in metrics.items() for k, v in values.items()})
        tracker.log_artifacts(layout.REPORTS, artifact_path="reports")
        for row in summary.to_dict("records"):
            with tracker.child(row["method"], tags={"stage": "evaluate_method", "method": row["method"], "kind": row["kind"],
                                                    "summary": "false"}) as child:
                for seed_row in per_seed[per_seed["method"] == row["method"]].to_dict("records"):
                    child.log_metrics({k: seed_row[k] for k in SCALARS}, step=int(seed_row["seed"]))
                child.log_metrics({f"{k}_mean": row[f"{k}_mean"] for k in SCALARS})
                child.log_metrics({f"{k}_std": row[f"{k}_std"] for k in SCALARS})
        # the best merged model (fine-tuned) as an MLflow Model in the Model Registry (issue 13)
        tracker.log_dataset(layout.processed_dir(params.data.target), params.data.target, {"test": "testing"})
        if params.mlflow.registered_model:
            best, seed = best_model(per_seed, list(params.methods))
            register_best_model(layout.seed_dir(layout.MERGED_FT / best, seed), method=best, seed=seed,
                                metrics=metrics[best], registered_name=params.mlflow.registered_model,
                                input_example=data.test.images[:1])


if __name__ == "__main__":
    run(main)
