"""Stage collapse@<method>-<seed>: apply one seed's coefficients once -> models/merged/<method>/seed_<n>/.

Reads models/merge/<method>/seed_<n>, the sources that merge used (models/<merge.sources_from>/seed_<n>,
models/sources) and the target data. Writes an ordinary timm checkpoint (it loads with
``timm.create_model(arch, num_classes=K)`` and ``load_state_dict(strict=True)``) and its predictions.csv.
BatchNorm running statistics are recalibrated on the target training split when ``merge.bn_recalibration``
(per method) is on.
"""

import argparse

from safetensors.torch import load_file

from medmerge import layout
from medmerge.io import read_json
from medmerge.merge.alignment import load_permutations
from medmerge.methods import rebuild_merge
from medmerge.models import load_model_dir, save_model_dir
from medmerge.pipeline import (
    apply_saved_permutations,
    collapse,
    model_state_cpu,
    restore_merge_state,
    split_predictions,
)
from medmerge.predictions import write_predictions
from medmerge.stage import (
    add_seed_argument,
    model_input,
    run,
    seed_everything,
    stage_dataset,
    stage_output,
    stage_params,
    stage_runtime,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="a key of params.yaml methods")
    add_seed_argument(parser)
    args = parser.parse_args()
    params, _ = stage_params()
    settings, seed = params.method(args.method), args.seed
    runtime = stage_runtime(params)
    seed_everything(seed)
    merge_dir = layout.merge_dir(layout.MERGE, args.method, seed)
    info = read_json(merge_dir / "merge.json")
    data = stage_dataset(params, params.data.target, params.evaluate.batch_size, runtime, seed=seed)
    sources = [load_model_dir(layout.source_dir(info["sources_from"], name, seed))[0] for name in info["sources"]]
    if (merge_dir / "permutations.safetensors").is_file():
        permutations = load_permutations(merge_dir / "permutations.safetensors")
        sources = apply_saved_permutations(info["arch"], sources, info["sources"], permutations)
    merge = rebuild_merge(info["arch"], sources, info["sources"], info["num_classes"], settings)
    restore_merge_state(merge, load_file(merge_dir / "merge_state.safetensors"))
    recalibrate_on = data if settings.bn_recalibration else None
    model = collapse(merge, info["arch"], info["num_classes"], recalibrate_on, runtime, seed=seed,
                     repair_data=data if settings.repair else None)
    card = {"arch": info["arch"], "num_classes": info["num_classes"], "classes": info["classes"],
            "task": params.data.target, "stage": "collapse", "method": args.method,
            "merge_method": settings.method, "sources": info["sources"], "seed": seed,
            "align": info["align"], "bn_recalibrated": settings.bn_recalibration, "repaired": settings.repair,
            "input": model_input(info["arch"], params.data.target)}
    with stage_output(layout.merge_dir(layout.MERGED, args.method, seed)) as out:
        save_model_dir(out, model_state_cpu(model), card)
        write_predictions(out / layout.PREDICTIONS, split_predictions(model, info["arch"], data, runtime),
                          data.classes)

if __name__ == "__main__":
    run(main)
