"""Stages pretrain@<source>, finetune@<source> and finetune_merged: one training job, three sets of inputs.

- pretrain <source>:   models/sources/<source>   on the source's own task -> models/pretrained/<source>
- finetune <source>:   models/pretrained/<source> on the target task      -> models/finetuned/<source> (FT)
- finetune_merged:     models/merged              on the target task      -> models/merged_ft
"""

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from medmerge import distributed, layout
from medmerge.config import Params, TrainSettings
from medmerge.models import load_model_dir, save_model_dir
from medmerge.pipeline import model_state_cpu, test_metrics, train_classifier
from medmerge.stage import maybe_relaunch, run, seed_everything, stage_dataset, stage_params, stage_runtime
from medmerge.tracking import stage_run

log = logging.getLogger("medmerge.stages.train")


@dataclass
class Job:
    init_dir: Path
    dataset: str
    settings: TrainSettings
    epochs: int
    out_dir: Path
    label: str
    tags: dict
    keep_head: bool = False


def job_for(stage: str, source: str | None, params: Params) -> Job:
    if stage == "finetune_merged":
        return Job(layout.MERGED, params.data.target, params.finetune, params.merge.finetune_epochs,
                   layout.MERGED_FT, "finetune merged", {"method": "medmerge"}, keep_head=True)
    if source not in params.sources:
        raise SystemExit(f"{stage}: unknown source '{source}'; params.yaml sources are {sorted(params.sources)}")
    if stage == "pretrain":
        task = params.sources[source].task
        return Job(layout.SOURCES / source, task, params.pretrain, params.pretrain.epochs,
                   layout.PRETRAINED / source, f"pretrain {source} on {task}", {"source": source})
    return Job(layout.PRETRAINED / source, params.data.target, params.finetune, params.finetune.epochs,
               layout.FINETUNED / source, f"finetune {source}", {"source": source, "method": f"ft_{source}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["pretrain", "finetune", "finetune_merged"])
    parser.add_argument("source", nargs="?")
    args = parser.parse_args()
    params, flat = stage_params()
    job = job_for(args.stage, args.source, params)
    maybe_relaunch(params, "stages.train", sys.argv[1:])  # device.processes > 1: rerun under torchrun
    seed_everything(params.data.seed)
    runtime = stage_runtime(params)
    data = stage_dataset(params, job.dataset, job.settings.batch_size, runtime)
    init_state, init_card = load_model_dir(job.init_dir)
    with stage_run(args.stage, params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                   run_name=job.label, tags=job.tags) as tracker:
        model, history = train_classifier(
            params.arch, init_state, data, job.settings, runtime, epochs=job.epochs, seed=params.data.seed,
            keep_head=job.keep_head, on_epoch=tracker.log_epoch, description=job.label,
        )
        if history.epochs:
            tracker.log_metrics({"best_val_f1_macro": history.best_val_f1})
        if args.stage == "pretrain" and distributed.is_main():
            metrics = test_metrics(model, params.arch, data, runtime)
            tracker.log_metrics({f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)})
            log.info("%s: test macro F1 %.4f", job.label, metrics["f1_macro"])
    card = {"arch": params.arch, "num_classes": data.num_classes, "classes": data.classes, "task": job.dataset,
            "stage": args.stage, "init": str(job.init_dir), "init_sha256": init_card.get("sha256"),
            "epochs": job.epochs, "best_epoch": history.best_epoch, **job.tags}
    if distributed.is_main():  # every process holds the same model; rank 0 writes it
        save_model_dir(job.out_dir, model_state_cpu(model), card)


if __name__ == "__main__":
    run(main)
