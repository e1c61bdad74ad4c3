"""Stage collapse: apply the learned coefficients once -> models/merged/, an ordinary timm checkpoint.

It loads with ``timm.create_model(arch, num_classes=K)`` and ``load_state_dict(strict=True)``; its
BatchNorm running statistics are recalibrated on the target training set (``merge.bn_recalibration``).
"""

from safetensors.torch import load_file

from medmerge import layout
from medmerge.io import read_json
from medmerge.models import load_model_dir, save_model_dir
from medmerge.pipeline import build_kernel_merge, collapse, model_state_cpu, restore_merge_state
from medmerge.stage import run, seed_everything, stage_dataset, stage_params, stage_runtime


def main() -> None:
    params, _ = stage_params()
    seed_everything(params.data.seed)
    info = read_json(layout.MERGE / "merge.json")
    runtime = stage_runtime(params)
    data = stage_dataset(params, params.data.target, params.evaluate.batch_size, runtime)
    source_dir = layout.SOURCE_STAGES[info["sources_from"]]
    sources = [load_model_dir(source_dir / name)[0] for name in info["sources"]]
    merge = build_kernel_merge(info["arch"], sources, info["sources"], info["num_classes"], params.merge)
    restore_merge_state(merge, load_file(layout.MERGE / "merge_state.safetensors"))
    recalibrate_on = data if params.merge.bn_recalibration else None
    model = collapse(merge, info["arch"], info["num_classes"], recalibrate_on, runtime, seed=params.data.seed)
    card = {"arch": info["arch"], "num_classes": info["num_classes"], "classes": info["classes"],
            "task": params.data.target, "stage": "collapse", "method": "medmerge", "sources": info["sources"],
            "bn_recalibrated": params.merge.bn_recalibration}
    save_model_dir(layout.MERGED, model_state_cpu(model), card)


if __name__ == "__main__":
    run(main)
