"""Stage merge@<method>-<seed>: one compared merge for one seed, learned, collapsed and fine-tuned.

Reads that seed's sources (models/<merge.sources_from>/seed_<n>/<source>, and models/sources/<source> for
a source used as given), for a method that learns from them (``distill``) the FT baselines
(models/ft/seed_<n>/<source>), and the prepared target data, and runs ``methods.<method>`` in three steps:

1. learn (average, interpolate or medmerge at its granularity; aligned first if ``align: weight_matching`` or
   ``activation_matching``, the latter on the target training images)
   -> models/merge/<method>/seed_<n>/: coefficients.safetensors (normalised weight of each source per
   coefficient group), merge_state.safetensors (logits, head, BN buffers: with the sources, enough to rebuild
   the merge, see ``medmerge.methods.rebuild_merge``), permutations.safetensors (when aligned),
   layers.csv + layers.png (mean coefficient of each source per layer) and merge.json;
2. collapse: the coefficients applied once -> models/merged/<method>/seed_<n>/, an ordinary timm checkpoint
   (it loads with ``timm.create_model(arch, num_classes=K)`` and ``load_state_dict(strict=True)``) and its
   predictions.csv; BatchNorm statistics recalibrated on the target training split when
   ``merge.bn_recalibration`` (per method) is on, REPAIR first when ``merge.repair``;
3. fine-tune: that model fine-tuned on the target with ``finetune`` for ``merge.finetune_epochs`` epochs
   -> models/merged_ft/<method>/seed_<n>/ with its predictions.csv.

One process does the three: they share the sources, the data and the learned merge in memory, and the
torch/timm/MLflow start-up is paid once. The three directories are replaced together when the stage
succeeds; a killed stage keeps its fits' resume checkpoints, so its rerun continues where it stopped.
"""

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from medmerge import distributed, layout
from medmerge.config import MergeSettings, Params
from medmerge.data.target import TargetData
from medmerge.io import read_json, write_json
from medmerge.jobs import finetune_merged_job, train_job
from medmerge.merge.alignment import align_sources, align_sources_by_activations, save_permutations
from medmerge.merge.collapse import collapse, merge_state_to_save, recalibrate_on_target
from medmerge.methods import MergeInputs, MergeResult, get_method, run_merge_method
from medmerge.models import load_model_dir, model_state_cpu, save_model_dir
from medmerge.plots import plot_layer_coefficients
from medmerge.predictions import write_predictions
from medmerge.scoring import split_predictions
from medmerge.stage import (
    add_seed_argument,
    maybe_relaunch,
    model_input,
    run,
    seed_everything,
    stage_dataset,
    stage_output,
    stage_params,
    stage_resume,
    stage_runtime,
)
from medmerge.tracking import TRAINING_SPLITS, stage_run


def merge_sources(arch: str, names: list[str], sources_from: str, seed: int, anchor: str, align: str,
                  data: TargetData | None = None, runtime=None) -> tuple:
    """Seed ``seed``'s sources, aligned onto ``anchor`` if asked, with permutations and alignment report;
    activation matching reads the sources' features on ``data``'s training images (unaugmented)."""
    sources = [load_model_dir(layout.source_dir(sources_from, name, seed))[0] for name in names]
    if align == "weight_matching":
        return align_sources(arch, sources, names, anchor)
    if align == "activation_matching":
        return align_sources_by_activations(arch, sources, names, anchor, target_inputs(arch, data, runtime, seed),
                                            runtime.device)
    return sources, {}, {}


def target_inputs(arch: str, data: TargetData, runtime, seed: int, batch_size: int = 16):
    """A fresh iterator over the target training images, in order, normalised as the sources saw them."""
    from medmerge.train import make_transform

    transform = make_transform(arch, runtime, seed)
    return lambda: (transform(images) for images, _ in data.train.in_order(batch_size))


def merge_teachers(names: list[str], seed: int) -> list[dict]:
    """Seed ``seed``'s FT baselines of every source (models/ft/seed_<n>/<source>), for a method that learns from
    their ensemble (``needs_teachers``)."""
    return [load_model_dir(layout.source_dir("ft", name, seed))[0] for name in names]


def learn(method: str, params: Params, flat: dict, settings: MergeSettings, seed: int, runtime, data: TargetData,
          out: Path) -> tuple[MergeResult, dict]:
    """Step 1: the merge's coefficients and head, learned on ``data`` under an MLflow run and written to
    ``out``; the result and merge.json's contents."""
    names = params.source_names
    sources, permutations, alignment = merge_sources(params.arch, names, settings.sources_from, seed,
                                                     settings.anchor, settings.align, data, runtime)
    tags = {"method": method, "merge_method": settings.method, "seed": str(seed), "align": settings.align}
    with stage_run("learn_weights", params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                   run_name=f"{method} seed {seed}", tags=tags) as tracker:
        tracker.log_dataset(layout.processed_dir(params.data.target), params.data.target, TRAINING_SPLITS)
        teachers = merge_teachers(names, seed) if get_method(settings.method).needs_teachers else None
        result = run_merge_method(MergeInputs(params.arch, sources, names, data, settings, runtime, seed,
                                              on_epoch=tracker.log_epoch, resume=stage_resume(params),
                                              teachers=teachers))
        merge = result.merge.cpu() if result.merge is not None else None
        if merge is not None:  # the granularity the merge has (average and interpolate: one weight per model)
            tracker.set_tags({"granularity": merge.granularity})
        info = {
            "name": method, "method": settings.method, "seed": seed, "arch": params.arch,
            "sources": names, "sources_from": settings.sources_from, "classes": data.classes,
            "num_classes": data.num_classes, "granularity": merge.granularity if merge else None,
            "normalization": merge.normalizer.name if merge else None, "anchor": settings.anchor,
            "align": settings.align, "alignment": alignment, "train_sources": settings.train_sources,
            "best_val_f1_macro": result.val_f1, "mean_coefficient": merge.source_means() if merge else None,
            **result.details, "compute": runtime.compute,
        }
        if not distributed.is_main():  # every process holds the same coefficients; rank 0 writes them
            return result, info
        if merge is None:  # a merged model built directly: no coefficients to save
            write_json(out / "merge.json", info)
            tracker.log_metrics({"best_val_f1_macro": result.val_f1})
            tracker.log_artifacts(out, artifact_path="coefficients")
            return result, info
        summary = merge.layer_summary()
        # one metadata key: safetensors writes several in a random order, and the file would change every run
        # (method and granularity are in merge.json)
        save_file(merge.coefficient_tensors(), out / "coefficients.safetensors", metadata={"sources": ",".join(names)})
        save_file(merge_state_to_save(merge), out / "merge_state.safetensors")
        if permutations:
            save_permutations(permutations, out / "permutations.safetensors")
        summary.to_csv(out / "layers.csv", index=False)
        plot_layer_coefficients(summary, names, out / "layers.png",
                                title=f"{method} (seed {seed}): mean coefficient per layer")
        write_json(out / "merge.json", info)
        tracker.log_metrics({f"coef_mean.{name}": value for name, value in info["mean_coefficient"].items()})
        tracker.log_metrics({"best_val_f1_macro": result.val_f1})
        if "alpha" in result.details:
            tracker.log_metrics({"alpha": result.details["alpha"]})
        for name, report in alignment.items():
            tracker.log_metrics({f"align.{name}.{key}": value for key, value in report.items()})
        tracker.log_artifacts(out, artifact_path="coefficients")
    return result, info


def collapse_learned(result: MergeResult, info: dict, method: str, params: Params, settings: MergeSettings,
                     seed: int, runtime, data: TargetData, out: Path) -> tuple[dict, dict]:
    """Step 2: the learned merge as one ordinary model (BatchNorm recalibrated, REPAIR, on ``data.train``),
    written to ``out``; its state and card."""
    if result.merge is None:  # the method built the merged model itself
        model = runtime.prepare(result.model)
        if settings.bn_recalibration:
            recalibrate_on_target(model, info["arch"], data, runtime, seed)
        model.eval()
    else:
        model = collapse(result.merge, info["arch"], info["num_classes"],
                         data if settings.bn_recalibration else None, runtime, seed=seed,
                         repair_data=data if settings.repair else None)
    card = {"arch": info["arch"], "num_classes": info["num_classes"], "classes": info["classes"],
            "task": params.data.target, "stage": "collapse", "method": method,
            "merge_method": settings.method, "sources": info["sources"], "seed": seed,
            "align": info["align"], "bn_recalibrated": settings.bn_recalibration, "repaired": settings.repair,
            "input": model_input(info["arch"], params.data.target), "compute": runtime.compute}
    state = model_state_cpu(model)
    if distributed.is_main():
        save_model_dir(out, state, card)
        write_predictions(out / layout.PREDICTIONS, split_predictions(model, info["arch"], data, runtime),
                          data.classes)
        card = read_json(out / "card.json")  # with the weights' sha256, for the fine-tune's card
    return state, card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="a key of params.yaml methods")
    add_seed_argument(parser)
    args = parser.parse_args()
    params, flat = stage_params()
    method, seed = args.method, args.seed
    settings = params.method(method)
    maybe_relaunch(params, "stages.merge", sys.argv[1:])  # device.processes > 1: rerun under torchrun
    runtime = stage_runtime(params)
    job = finetune_merged_job(method, seed, params)
    # the target, opened once; each step batches its training split as its settings say
    data = stage_dataset(params, params.data.target, settings.batch_size, runtime, seed=seed)
    with (stage_output(layout.merge_dir(layout.MERGE, method, seed)) as learned,
          stage_output(layout.merge_dir(layout.MERGED, method, seed)) as merged,
          stage_output(job.out_dir) as tuned):
        seed_everything(seed)  # before each step, so that each starts from the same random state
        result, info = learn(method, params, flat, settings, seed, runtime, data, learned)
        seed_everything(seed)
        state, card = collapse_learned(result, info, method, params, settings, seed, runtime,
                                       data.with_train_batch_size(params.evaluate.batch_size), merged)
        seed_everything(seed)
        train_job(job, params, flat, seed, runtime, data.with_train_batch_size(job.settings.batch_size), state,
                  card, tuned)


if __name__ == "__main__":
    run(main)
