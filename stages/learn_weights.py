"""Stage learn_weights@<method>-<seed>: one compared merge's coefficients and head, for one seed.

Reads that seed's sources (models/<merge.sources_from>/seed_<n>/<source>, and models/sources/<source> for
a source used as given) and the prepared target data; runs ``methods.<method>`` (average, interpolate or
medmerge at its granularity; aligned first if ``align: weight_matching``) and writes
models/merge/<method>/seed_<n>/: coefficients.safetensors (normalised weight of each source per
coefficient group), merge_state.safetensors (logits, head, BN buffers: what collapse needs besides the
sources), permutations.safetensors (when aligned), layers.csv + layers.png (mean coefficient of each
source per layer) and merge.json.
"""

import argparse
import sys

from safetensors.torch import save_file

from medmerge import distributed, layout
from medmerge.io import write_json
from medmerge.merge.alignment import save_permutations
from medmerge.methods import MergeInputs, run_merge_method
from medmerge.models import load_model_dir
from medmerge.pipeline import align_sources, merge_state_to_save
from medmerge.plots import plot_layer_coefficients
from medmerge.stage import (
    add_seed_argument,
    maybe_relaunch,
    run,
    seed_everything,
    stage_dataset,
    stage_output,
    stage_params,
    stage_resume,
    stage_runtime,
)
from medmerge.tracking import TRAINING_SPLITS, stage_run


def merge_sources(arch: str, names: list[str], sources_from: str, seed: int, anchor: str, align: str) -> tuple:
    """Seed ``seed``'s sources, aligned onto ``anchor`` if asked, with permutations and alignment report."""
    sources = [load_model_dir(layout.source_dir(sources_from, name, seed))[0] for name in names]
    if align == "weight_matching":
        return align_sources(arch, sources, names, anchor)
    return sources, {}, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="a key of params.yaml methods")
    add_seed_argument(parser)
    args = parser.parse_args()
    params, flat = stage_params()
    settings, names, seed = params.method(args.method), params.source_names, args.seed
    maybe_relaunch(params, "stages.learn_weights", sys.argv[1:])  # device.processes > 1: rerun under torchrun
    runtime = stage_runtime(params)
    seed_everything(seed)
    data = stage_dataset(params, params.data.target, settings.batch_size, runtime, seed=seed)
    sources, permutations, alignment = merge_sources(params.arch, names, settings.sources_from, seed,
                                                     settings.anchor, settings.align)
    tags = {"method": args.method, "merge_method": settings.method, "seed": str(seed),
            "granularity": settings.granularity, "align": settings.align}
    with stage_output(layout.merge_dir(layout.MERGE, args.method, seed)) as out:
        with stage_run("learn_weights", params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                       run_name=f"{args.method} seed {seed}", tags=tags) as tracker:
            tracker.log_dataset(layout.processed_dir(params.data.target), params.data.target, TRAINING_SPLITS)
            result = run_merge_method(MergeInputs(params.arch, sources, names, data, settings, runtime, seed,
                                                  on_epoch=tracker.log_epoch, resume=stage_resume(params)))
            if not distributed.is_main():  # every process holds the same coefficients; rank 0 writes them
                return
            merge = result.merge.cpu()
            summary, means = merge.layer_summary(), merge.source_means()
            save_file(merge.coefficient_tensors(), out / "coefficients.safetensors",
                      metadata={"sources": ",".join(names), "method": settings.method,
                                "granularity": merge.granularity})
            save_file(merge_state_to_save(merge), out / "merge_state.safetensors")
            if permutations:
                save_permutations(permutations, out / "permutations.safetensors")
            summary.to_csv(out / "layers.csv", index=False)
            plot_layer_coefficients(summary, names, out / "layers.png",
                                    title=f"{args.method} (seed {seed}): mean coefficient per layer")
            write_json(out / "merge.json", {
                "name": args.method, "method": settings.method, "seed": seed, "arch": params.arch,
                "sources": names, "sources_from": settings.sources_from, "classes": data.classes,
                "num_classes": data.num_classes, "granularity": merge.granularity,
                "normalization": merge.normalizer.name, "anchor": settings.anchor, "align": settings.align,
                "alignment": alignment, "train_sources": settings.train_sources,
                "best_val_f1_macro": result.val_f1, "mean_coefficient": means, **result.details,
            })
            tracker.log_metrics({f"coef_mean.{name}": value for name, value in means.items()})
            tracker.log_metrics({"best_val_f1_macro": result.val_f1})
            if "alpha" in result.details:
                tracker.log_metrics({"alpha": result.details["alpha"]})
            for name, report in alignment.items():
                tracker.log_metrics({f"align.{name}.{key}": value for key, value in report.items()})
            tracker.log_artifacts(out, artifact_path="coefficients")

if __name__ == "__main__":
    run(main)
