"""Stage collapse@<method>-<seed>: one seed's learned merge as one ordinary model.

Reads models/merge/<method>/seed_<n> (``learn@<method>-<seed>``), the sources it merged
(models/<merge.sources_from>/seed_<n>, models/sources), the target data, and of the merge's settings
models/settings/<method>/learn.json (the merge's shape) and collapse.json (``bn_recalibration``,
``repair``). Writes models/merged/<method>/seed_<n>/: an ordinary timm checkpoint (it loads with
``timm.create_model(arch, num_classes=K)`` and ``load_state_dict(strict=True)``) and its predictions.csv.
A coefficient merge is collapsed by applying its coefficients once; a merged model the method built
itself is taken as it is. BatchNorm statistics are then recalibrated on the target training split when
``bn_recalibration`` is on, REPAIR first when ``repair`` is.
"""


from medmerge import layout
from medmerge.merge.inputs import collapse_learned
from medmerge.models import model_state_cpu, save_model_dir
from medmerge.predictions import write_predictions
from medmerge.scoring import split_predictions
from medmerge.stage import (
    merge_stage_arguments,
    merge_step_settings,
    model_input,
    run,
    seed_everything,
    stage_dataset,
    stage_output,
    stage_params,
    stage_runtime,
)


def main() -> None:
    args = merge_stage_arguments(__doc__)
    params, _ = stage_params()
    method, seed = args.method, args.seed
    settings = merge_step_settings(params, method, "learn", "collapse")
    runtime = stage_runtime(params)
    seed_everything(seed)
    data = stage_dataset(params, params.data.target, params.evaluate.batch_size, runtime, seed=seed)
    merge_dir = layout.merge_dir(layout.MERGE, method, seed)
    model, info = collapse_learned(merge_dir, settings, data, runtime, seed)
    card = {"arch": info["arch"], "num_classes": info["num_classes"], "classes": info["classes"],
            "task": params.data.target, "stage": "collapse", "method": method,
            "merge_method": settings.method, "sources": info["sources"], "seed": seed,
            "align": settings.align, "bn_recalibrated": settings.bn_recalibration, "repaired": settings.repair,
            "input": model_input(info["arch"], params.data.target), "compute": runtime.compute}
    with stage_output(layout.merge_dir(layout.MERGED, method, seed)) as out:
        save_model_dir(out, model_state_cpu(model), card)
        write_predictions(out / layout.PREDICTIONS, split_predictions(model, info["arch"], data, runtime),
                          data.classes)


if __name__ == "__main__":
    run(main)
