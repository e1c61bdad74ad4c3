"""Stages pretrain@<source>-<seed> and baseline@<recipe>-<source>-<seed>; the fine-tune of merge@<method>-<seed>.

- pretrain <source> --seed n: models/sources/<source> trained on the source's task
  -> models/pretrained/seed_<n>/<source>. A source without a task is used as fetched: the directory then
  holds only a card pointing at models/sources/<source>, and nothing trains.
- ft <source> --seed n:   models/pretrained/seed_<n>/<source> fine-tuned on the target -> models/ft/seed_<n>/<source>
- lpft <source> --seed n: the same, linear probe first (LP-FT)                      -> models/lpft/seed_<n>/<source>

``stages.merge`` fine-tunes its collapsed model with :func:`finetune_merged_job` and :func:`train_job`
(models/merged/<method>/seed_<n> -> models/merged_ft/<method>/seed_<n>).

Target-side models also write predictions.csv (validation and test logits), which ``evaluate`` reads.
"""

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from medmerge import distributed, layout
from medmerge.config import Params, TrainSettings
from medmerge.models import load_model_dir, save_model_dir, write_pointer_dir
from medmerge.pipeline import TargetData, model_state_cpu, split_predictions, test_metrics, train_classifier
from medmerge.predictions import write_predictions
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

log = logging.getLogger("medmerge.stages.train")
JOBS = ("pretrain", "ft", "lpft")


@dataclass
class Job:
    """One training job: where it starts, what it trains on, where it writes."""

    stage: str
    init_dir: Path
    dataset: str
    settings: TrainSettings
    epochs: int
    out_dir: Path
    label: str
    tags: dict
    keep_head: bool = False
    linear_probe: bool = False

    @property
    def on_target(self) -> bool:
        return self.stage != "pretrain"


def finetune_merged_job(method: str, seed: int, params: Params) -> Job:
    """The fine-tune of merge ``method``'s collapsed model for ``seed`` (``merge.finetune_epochs`` epochs)."""
    return Job("finetune_merged", layout.merge_dir(layout.MERGED, method, seed), params.data.target,
               params.finetune, params.method(method).finetune_epochs, layout.merge_dir(layout.MERGED_FT, method, seed),
               f"finetune merged {method} seed {seed}", {"seed": str(seed), "method": method}, keep_head=True)


def job_for(stage: str, name: str, seed: int, params: Params) -> Job | None:
    """The job for ``python -m stages.train <stage> <source> --seed <seed>``; None for pretraining a source that
    is used as given. An unknown source stops with the valid ones."""
    tags = {"seed": str(seed)}
    if name not in params.sources:
        raise SystemExit(f"{stage}: unknown source '{name}'; params.yaml sources are {sorted(params.sources)}")
    if stage == "pretrain":
        task = params.sources[name].task
        if task is None:
            return None
        settings = params.pretrain_settings(name)
        return Job(stage, layout.SOURCES / name, task, settings, settings.epochs,
                   layout.source_dir("pretrained", name, seed), f"pretrain {name} on {task} seed {seed}",
                   {**tags, "source": name})
    return Job(stage, layout.source_dir("pretrained", name, seed), params.data.target, params.finetune,
               params.finetune.epochs, layout.source_dir(stage, name, seed), f"{stage} {name} seed {seed}",
               {**tags, "source": name, "method": f"{stage}_{name}"}, linear_probe=stage == "lpft")


def train_job(job: Job, params: Params, flat: dict, seed: int, runtime, data: TargetData, init_state: dict,
              init_card: dict, out: Path) -> None:
    """Train ``job`` from ``init_state`` on ``data`` (``job.dataset``, batched by ``job.settings``) under its own
    MLflow run; write the model directory to ``out`` (with predictions.csv on the target task, the test
    metrics logged for a source task)."""
    with stage_run(job.stage, params.mlflow.experiment, flat, params.mlflow.tracking_uri,
                   run_name=job.label, tags=job.tags) as tracker:
        tracker.log_dataset(layout.processed_dir(job.dataset), job.dataset, TRAINING_SPLITS)
        model, history = train_classifier(
            params.arch, init_state, data, job.settings, runtime, epochs=job.epochs, seed=seed,
            keep_head=job.keep_head, linear_probe=job.linear_probe, on_epoch=tracker.log_epoch,
            description=job.label, resume=stage_resume(params),
        )
        if history.epochs:
            tracker.log_metrics({"best_val_f1_macro": history.best_val_f1})
        if not job.on_target and distributed.is_main():
            metrics = test_metrics(model, params.arch, data, runtime)
            tracker.log_metrics({f"test_{k}": v for k, v in metrics.items() if isinstance(v, float)})
            log.info("%s: test macro F1 %.4f", job.label, metrics["f1_macro"])
    card = {"arch": params.arch, "num_classes": data.num_classes, "classes": data.classes,
            "task": job.dataset, "stage": job.stage, "init": str(job.init_dir),
            "init_sha256": init_card.get("sha256"), "epochs": job.epochs, "best_epoch": history.best_epoch,
            "linear_probe": job.linear_probe, "input": model_input(params.arch, job.dataset), **job.tags,
            "seed": seed, "compute": runtime.compute}
    save_model_dir(out, model_state_cpu(model), card)
    if job.on_target and distributed.is_main():
        write_predictions(out / layout.PREDICTIONS, split_predictions(model, params.arch, data, runtime),
                          data.classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=JOBS)
    parser.add_argument("name", help="the source")
    add_seed_argument(parser)
    args = parser.parse_args()
    params, flat = stage_params()
    job = job_for(args.stage, args.name, args.seed, params)
    if job is None:  # a source without a task: used as fetched, the same in every seed
        write_pointer_dir(layout.source_dir("pretrained", args.name, args.seed), layout.SOURCES / args.name,
                          {"stage": "pretrain", "as_given": True})
        log.info("source %s has no task: used as fetched", args.name)
        return
    maybe_relaunch(params, "stages.train", sys.argv[1:])  # device.processes > 1: rerun under torchrun
    runtime = stage_runtime(params)
    seed_everything(args.seed)
    data = stage_dataset(params, job.dataset, job.settings.batch_size, runtime, seed=args.seed)
    init_state, init_card = load_model_dir(job.init_dir)
    with stage_output(job.out_dir) as out:
        train_job(job, params, flat, args.seed, runtime, data, init_state, init_card, out)


if __name__ == "__main__":
    run(main)
