"""What every stage script shares: :mod:`~medmerge.stage.cli` (logging, params, the seed argument and
:func:`run`, which turns bad input into a clear exit), :mod:`~medmerge.stage.runtime` (seed, device and
threads, the process group and torchrun relaunch of a multi-process run, the target dataset) and
:mod:`~medmerge.stage.outputs` (the atomic output directory, resume checkpoints, model input cards)."""

from medmerge.stage.cli import (
    add_seed_argument,
    merge_stage_arguments,
    merge_step_settings,
    merge_step_values,
    run,
    stage_params,
)
from medmerge.stage.outputs import model_input, stage_output, stage_resume
from medmerge.stage.runtime import maybe_relaunch, seed_everything, stage_dataset, stage_runtime

__all__ = [
    "add_seed_argument",
    "maybe_relaunch",
    "merge_stage_arguments",
    "merge_step_settings",
    "merge_step_values",
    "model_input",
    "run",
    "seed_everything",
    "stage_dataset",
    "stage_output",
    "stage_params",
    "stage_resume",
    "stage_runtime",
]
