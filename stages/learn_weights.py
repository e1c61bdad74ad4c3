"""Stage learn_weights: MedMerge's per-kernel coefficients learned on the target task.

Reads the sources from models/<merge.sources_from>/<source>/ and the prepared target data; writes
models/merge/: coefficients.safetensors (normalised weight of each source per coefficient group),
merge_state.safetensors (logits, new head, BN buffers: what collapse needs besides the sources),
layers.csv + layers.png (mean coefficient of each source per layer) and merge.json.
"""

import sys

from safetensors.torch import save_file

from medmerge import distributed, layout
from medmerge.io import atomic_directory, write_json
from medmerge.models import load_model_dir
from medmerge.pipeline import build_kernel_merge, learn_kernel_weights, merge_state_to_save
from medmerge.plots import plot_layer_coefficients
from medmerge.stage import maybe_relaunch, run, seed_everything, stage_dataset, stage_params, stage_runtime
from medmerge.tracking import stage_run


def main() -> None:
    params, flat = stage_params()
    settings, names = params.merge, params.source_names
    maybe_relaunch(params, "stages.learn_weights", sys.argv[1:])  # device.processes > 1: rerun under torchrun
    seed_everything(params.data.seed)
    runtime = stage_runtime(params)
    data = stage_dataset(params, params.data.target, settings.batch_size, runtime)
    source_dir = layout.SOURCE_STAGES[settings.sources_from]
    sources = [load_model_dir(source_dir / name)[0] for name in names]
    merge = build_kernel_merge(params.arch, sources, names, data.num_classes, settings, seed=params.data.seed)
    with stage_run("learn_weights", params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                   run_name="learn kernel weights", tags={"method": "medmerge"}) as tracker:
        history = learn_kernel_weights(merge, params.arch, data, settings, runtime, seed=params.data.seed,
                                       on_epoch=tracker.log_epoch)
        if not distributed.is_main():  # every process holds the same coefficients; rank 0 writes them
            return
        merge = merge.cpu()
        summary = merge.layer_summary()
        means = merge.source_means()
        with atomic_directory(layout.MERGE) as out:
            save_file(merge.coefficient_tensors(), out / "coefficients.safetensors",
                      metadata={"sources": ",".join(names), "granularity": settings.granularity})
            save_file(merge_state_to_save(merge), out / "merge_state.safetensors")
            summary.to_csv(out / "layers.csv", index=False)
            plot_layer_coefficients(summary, names, out / "layers.png")
            write_json(out / "merge.json", {
                "arch": params.arch, "sources": names, "sources_from": settings.sources_from,
                "classes": data.classes, "num_classes": data.num_classes, "granularity": settings.granularity,
                "normalization": merge.normalizer.name, "anchor": settings.anchor,
                "train_sources": settings.train_sources, "best_epoch": history.best_epoch,
                "best_val_f1_macro": history.best_val_f1, "mean_coefficient": means,
            })
        tracker.log_metrics({f"coef_mean.{name}": value for name, value in means.items()})
        tracker.log_metrics({"best_val_f1_macro": history.best_val_f1})
        tracker.log_artifacts(layout.MERGE, artifact_path="coefficients")


if __name__ == "__main__":
    run(main)
