"""Stage learn@<method>-<seed>: one compared merge of one seed, learned on the target.

Reads that seed's sources (models/<merge.sources_from>/seed_<n>/<source>, and models/sources/<source> for a
source used as given), for a method that learns from them (``distill``) the FT baselines
(models/teachers/<method>/seed_<n>/<source>, from ``teachers@<method>-<seed>``), the prepared target data, and of the merge's settings only
models/settings/<method>/learn.json (``merge_settings@<method>``: the keys its learning reads). It runs
the method (average, interpolate, medmerge at its granularity, pleas, zipit, distill; aligned first if
``align: weight_matching`` or ``activation_matching``, the latter on the target training images) under an
MLflow ``learn_weights`` run and writes models/merge/<method>/seed_<n>/:

- a coefficient merge: coefficients.safetensors (normalised weight of each source per coefficient group),
  merge_state.safetensors (logits, head, BN buffers: with the sources, enough to rebuild the merge, see
  ``medmerge.methods.rebuild_merge``), permutations.safetensors (when aligned), layers.csv + layers.png
  (mean coefficient of each source per layer);
- a method that builds the merged model itself (pleas, zipit, distill): that model in model/ (timm layout);
- merge.json: what was merged and how, with its validation macro F1.

``collapse@<method>-<seed>`` turns it into one ordinary model. A killed stage keeps its fit's resume
checkpoint, so its rerun continues where it stopped.
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

from medmerge import distributed, layout
from medmerge.config import MergeSettings, Params
from medmerge.data.target import TargetData
from medmerge.io import write_json
from medmerge.merge.alignment import save_permutations
from medmerge.merge.collapse import merge_state_to_save
from medmerge.merge.inputs import MERGE_STATE, MODEL, PERMUTATIONS, load_sources, load_teachers
from medmerge.methods import MergeInputs, MergeResult, get_method, run_merge_method
from medmerge.models import model_state_cpu, save_model_dir
from medmerge.plots import plot_layer_coefficients
from medmerge.stage import (
    maybe_relaunch,
    merge_stage_arguments,
    merge_step_settings,
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


def learn(method: str, params: Params, flat: dict, settings: MergeSettings, seed: int, runtime, data: TargetData,
          out: Path) -> MergeResult:
    """The merge's coefficients and head (or its merged model), learned on ``data`` under an MLflow run and
    written to ``out``."""
    names = params.source_names
    sources, permutations, alignment = load_sources(params.arch, names, settings.sources_from, seed,
                                                    settings.anchor, settings.align, data, runtime)
    tags = {"method": method, "merge_method": settings.method, "seed": str(seed), "align": settings.align}
    with stage_run("learn_weights", params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                   run_name=f"{method} seed {seed}", tags=tags) as tracker:
        tracker.log_dataset(layout.processed_dir(params.data.target), params.data.target, TRAINING_SPLITS)
        teachers = load_teachers(method, names, seed) if get_method(settings.method).needs_teachers else None
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
        if not distributed.is_main():  # every process holds the same result; rank 0 writes it
            return result
        tracker.log_metrics({"best_val_f1_macro": result.val_f1})
        if merge is None:  # a merged model built directly: no coefficients, the model itself
            card = {"arch": params.arch, "num_classes": data.num_classes, "classes": data.classes,
                    "task": params.data.target, "stage": "learn", "method": method, "merge_method": settings.method,
                    "sources": names, "seed": seed, "input": model_input(params.arch, params.data.target)}
            save_model_dir(out / MODEL, model_state_cpu(result.model), card)
        else:
            summary = merge.layer_summary()
            # one metadata key: safetensors writes several in a random order, and the file would change every
            # run (method and granularity are in merge.json)
            save_file(merge.coefficient_tensors(), out / "coefficients.safetensors",
                      metadata={"sources": ",".join(names)})
            save_file(merge_state_to_save(merge), out / MERGE_STATE)
            if permutations:
                save_permutations(permutations, out / PERMUTATIONS)
            summary.to_csv(out / "layers.csv", index=False)
            plot_layer_coefficients(summary, names, out / "layers.png",
                                    title=f"{method} (seed {seed}): mean coefficient per layer")
            tracker.log_metrics({f"coef_mean.{name}": value for name, value in info["mean_coefficient"].items()})
        write_json(out / "merge.json", info)
        if "alpha" in result.details:
            tracker.log_metrics({"alpha": result.details["alpha"]})
        for name, report in alignment.items():
            tracker.log_metrics({f"align.{name}.{key}": value for key, value in report.items()})
        tracker.log_artifacts(out, artifact_path="coefficients")
    return result


def main() -> None:
    args = merge_stage_arguments(__doc__)
    params, flat = stage_params()
    settings = merge_step_settings(params, args.method, "learn")
    maybe_relaunch(params, "stages.learn", sys.argv[1:])  # device.processes > 1: rerun under torchrun
    runtime = stage_runtime(params)
    seed_everything(args.seed)
    data = stage_dataset(params, params.data.target, settings.batch_size, runtime, seed=args.seed)
    with stage_output(layout.merge_dir(layout.MERGE, args.method, args.seed)) as out:
        learn(args.method, params, flat, settings, args.seed, runtime, data, out)


if __name__ == "__main__":
    run(main)
