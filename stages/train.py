"""Stages pretrain@<source>-<seed>, baseline@<recipe>-<source>-<seed> and finetune_merged@<method>-<seed>.

- pretrain <source> --seed n: models/sources/<source> trained on the source's task
  -> models/pretrained/seed_<n>/<source>. A source without a task is used as fetched: the directory then
  holds only a card pointing at models/sources/<source>, and nothing trains.
- ft <source> --seed n:   models/pretrained/seed_<n>/<source> fine-tuned on the target -> models/ft/seed_<n>/<source>
- lpft <source> --seed n: the same, linear probe first (LP-FT)                      -> models/lpft/seed_<n>/<source>
- finetune_merged <method> --seed n: models/merged/<method>/seed_<n> (``collapse``) fine-tuned on the target
  with ``finetune`` for its ``finetune_epochs`` (models/settings/<method>/finetune.json, written by
  ``merge_settings@<method>``)                                                    -> models/merged_ft/<method>/seed_<n>

The jobs themselves are :mod:`medmerge.jobs`.

Target-side models also write predictions.csv (validation and test logits), which ``evaluate`` reads.
"""

import argparse
import logging
import sys

from medmerge import layout
from medmerge.jobs import FINETUNE_MERGED, JOBS, finetune_merged_job, job_for, train_job
from medmerge.models import load_model_dir, write_pointer_dir
from medmerge.stage import (
    add_seed_argument,
    maybe_relaunch,
    merge_step_values,
    run,
    seed_everything,
    stage_dataset,
    stage_output,
    stage_params,
    stage_runtime,
)

log = logging.getLogger("medmerge.stages.train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=JOBS)
    parser.add_argument("name", help="the source (finetune_merged: the merge, a key of params.yaml methods)")
    add_seed_argument(parser)
    args = parser.parse_args()
    params, flat = stage_params()
    if args.stage == FINETUNE_MERGED:
        epochs = merge_step_values(params, args.name, "finetune")["finetune_epochs"]
        job = finetune_merged_job(args.name, args.seed, params, epochs)
    else:
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
