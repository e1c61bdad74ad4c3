"""The training jobs of the training stages: what each trains from, on which dataset, into which directory,
and the one function that runs a job under its MLflow run and writes its model directory.

``stages/train.py`` runs them all: pretraining, the FT / LP-FT baselines and the fine-tune of a collapsed
merge (:func:`finetune_merged_job`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medmerge import distributed, layout
from medmerge.config import BASELINES, Params, TrainSettings
from medmerge.data.target import TargetData
from medmerge.models import model_state_cpu, save_model_dir
from medmerge.predictions import write_predictions
from medmerge.scoring import score_test_split, split_predictions
from medmerge.stage import model_input, stage_resume
from medmerge.tracking import TRAINING_SPLITS, stage_run
from medmerge.train import train_classifier

log = logging.getLogger("medmerge.jobs")
FINETUNE_MERGED = "finetune_merged"
JOBS = ("pretrain", *BASELINES, FINETUNE_MERGED)


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


def finetune_merged_job(method: str, seed: int, params: Params, epochs: int) -> Job:
    """The fine-tune of merge ``method``'s collapsed model for ``seed``, ``finetune`` for ``epochs`` epochs (its
    ``finetune_epochs``)."""
    return Job(FINETUNE_MERGED, layout.merge_dir(layout.MERGED, method, seed), params.data.target,
               params.finetune, epochs, layout.merge_dir(layout.MERGED_FT, method, seed),
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
            metrics = score_test_split(model, params.arch, data, runtime)
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
