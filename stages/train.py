"""Stages pretrain@<source>, baseline@<recipe>-<source> and finetune_merged@<method>: one training job.

- pretrain <source>:          models/sources/<source>    on the source's own task -> models/pretrained/<source>
- ft <source>:                models/pretrained/<source> fine-tuned on the target -> models/ft/<source>/seed_<n>
- lpft <source>:              the same, linear probe first (LP-FT)                -> models/lpft/<source>/seed_<n>
- finetune_merged <method>:   models/merged/<method>/seed_<n> fine-tuned           -> models/merged_ft/<method>/seed_<n>

Pretraining runs once (``data.seed``); every target-side job runs once per seed of ``seeds``.
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
from medmerge.stage import (
    maybe_relaunch,
    model_input,
    run,
    seed_everything,
    stage_dataset,
    stage_output,
    stage_params,
    stage_runtime,
)
from medmerge.tracking import TRAINING_SPLITS, stage_run

log = logging.getLogger("medmerge.stages.train")
JOBS = ("pretrain", "ft", "lpft", "finetune_merged")


@dataclass
class Job:
    """One training job: where it starts, what it trains on, where it writes (per seed if ``seeds``)."""

    stage: str
    init_dir: Path
    dataset: str
    settings: TrainSettings
    epochs: int
    out_dir: Path
    label: str
    tags: dict
    seeds: list[int]
    per_seed_init: bool = False  # init_dir holds seed_<n> directories
    keep_head: bool = False
    linear_probe: bool = False


def job_for(stage: str, name: str, params: Params) -> Job:
    """The job for ``python -m stages.train <stage> <name>``; an unknown name stops with the valid ones."""
    if stage == "finetune_merged":
        if name not in params.methods:
            raise SystemExit(f"{stage}: unknown method '{name}'; params.yaml methods are {sorted(params.methods)}")
        return Job(stage, layout.MERGED / name, params.data.target, params.finetune,
                   params.method(name).finetune_epochs, layout.MERGED_FT / name, f"finetune merged {name}",
                   {"method": name}, params.seeds, per_seed_init=True, keep_head=True)
    if name not in params.sources:
        raise SystemExit(f"{stage}: unknown source '{name}'; params.yaml sources are {sorted(params.sources)}")
    if stage == "pretrain":
        task = params.sources[name].task
        return Job(stage, layout.SOURCES / name, task, params.pretrain, params.pretrain.epochs,
                   layout.PRETRAINED / name, f"pretrain {name} on {task}", {"source": name}, [params.data.seed])
    return Job(stage, layout.PRETRAINED / name, params.data.target, params.finetune, params.finetune.epochs,
               layout.BASELINES[stage] / name, f"{stage} {name}", {"source": name, "method": f"{stage}_{name}"},
               params.seeds, linear_probe=stage == "lpft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=JOBS)
    parser.add_argument("name", help="the source (pretrain, ft, lpft) or the method (finetune_merged)")
    args = parser.parse_args()
    params, flat = stage_params()
    job = job_for(args.stage, args.name, params)
    maybe_relaunch(params, "stages.train", sys.argv[1:])  # device.processes > 1: rerun under torchrun
    runtime = stage_runtime(params)
    per_seed = job.stage != "pretrain"
    with stage_output(job.out_dir) as out:
        for seed in job.seeds:
            seed_everything(seed)
            data = stage_dataset(params, job.dataset, job.settings.batch_size, runtime, seed=seed)
            init_dir = layout.seed_dir(job.init_dir, seed) if job.per_seed_init else job.init_dir
            init_state, init_card = load_model_dir(init_dir)
            label = f"{job.label} seed {seed}" if per_seed else job.label
            with stage_run(job.stage, params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                           run_name=label, tags={**job.tags, "seed": str(seed)}) as tracker:
                tracker.log_dataset(layout.processed_dir(job.dataset), job.dataset, TRAINING_SPLITS)
                model, history = train_classifier(
                    params.arch, init_state, data, job.settings, runtime, epochs=job.epochs, seed=seed,
                    keep_head=job.keep_head, linear_probe=job.linear_probe, on_epoch=tracker.log_epoch,
                    description=label,
                )
                if history.epochs:
                    tracker.log_metrics({"best_val_f1_macro": history.best_val_f1})
                if job.stage == "pretrain" and distributed.is_main():
                    metrics = test_metrics(model, params.arch, data, runtime)
                    tracker.log_metrics({f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)})
                    log.info("%s: test macro F1 %.4f", job.label, metrics["f1_macro"])
            card = {"arch": params.arch, "num_classes": data.num_classes, "classes": data.classes,
                    "task": job.dataset, "stage": job.stage, "init": str(init_dir),
                    "init_sha256": init_card.get("sha256"), "epochs": job.epochs, "best_epoch": history.best_epoch,
                    "seed": seed, "linear_probe": job.linear_probe, "input": model_input(params.arch, job.dataset),
                    **job.tags}
            save_model_dir(layout.seed_dir(out, seed) if per_seed else out, model_state_cpu(model), card)


if __name__ == "__main__":
    run(main)
