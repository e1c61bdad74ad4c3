"""A stage script's frame: its logging, params and ``--seed`` argument, and :func:`run`, which turns bad
input into a one-line error and exit status 1."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Callable

from medmerge import layout
from medmerge.config import MergeSettings, Params, flatten, load_params
from medmerge.errors import InputError
from medmerge.io import read_json
from medmerge.stage.outputs import collecting_resume_dirs
from medmerge.stage.runtime import is_main_process, limit_threads, loaded_distributed

log = logging.getLogger("medmerge.stage")


def setup_logging() -> None:
    """INFO (or ``MEDMERGE_LOG_LEVEL``) in the main process; only warnings from the other ranks of a
    multi-process run, so each message appears once."""
    level = os.environ.get("MEDMERGE_LOG_LEVEL", "INFO") if is_main_process() else "WARNING"
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def stage_params() -> tuple[Params, dict]:
    """The validated params and their flattened dotted form (for MLflow)."""
    params = load_params()
    return params, flatten(params.model_dump(mode="json"))


def merge_step_values(params: Params, method: str, step: str) -> dict:
    """What step ``step`` of merge ``method`` (a key of ``params.methods``) reads of its settings: the file
    ``merge_settings@<method>`` wrote (models/settings/<method>/<step>.json), the only settings of the merge
    its learn, collapse or finetune_merged stage depends on."""
    params.method(method)  # an unknown merge stops here, naming the known ones
    return read_json(layout.settings_file(method, step))


def merge_step_settings(params: Params, method: str, *steps: str) -> MergeSettings:
    """Merge ``method``'s settings as its steps ``steps`` (``learn`` first) read them (:func:`merge_step_values`);
    keys that none of them reads keep their defaults, which those steps do not look at."""
    values: dict = {}
    for step in steps:
        values |= merge_step_values(params, method, step)
    return MergeSettings.model_validate(values)


def merge_stage_arguments(doc: str, seed: bool = True) -> argparse.Namespace:
    """The command line of a stage of one compared merge: ``<method>`` (a key of params.yaml ``methods``),
    and ``--seed N`` unless the stage is per method only."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="a key of params.yaml methods")
    if seed:
        add_seed_argument(parser)
    return parser.parse_args()


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    """``--seed N``: the one seed a per-seed stage runs (``dvc.yaml`` passes each of ``params.yaml`` seeds)."""
    parser.add_argument("--seed", type=int, required=True, help="the seed of this run (one of params.yaml seeds)")


def run(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; bad input (an :class:`~medmerge.errors.InputError` or a missing file) exits 1
    with its message instead of a traceback.

    In a multi-process run every process waits for the others (rank 0 writes the outputs) before leaving
    the process group. Once the stage has succeeded, its resume checkpoints
    (:func:`medmerge.stage.stage_resume`) are removed; a failed or killed stage keeps them for its rerun.

    A stage run as a script (``python -m stages.<name>``) then exits as any Python program does (other
    threads joined, exit handlers run, output flushed), except that the garbage collector no longer walks
    the objects alive now: with torch, timm and MLflow loaded that walk is most of the 1 to 2 s the
    interpreter's teardown takes, and it frees nothing that outlives the process.
    """
    setup_logging()
    limit_threads()
    try:
        with collecting_resume_dirs() as resume_dirs:
            main()
            if (distributed := loaded_distributed()) is not None:
                distributed.barrier()
            if is_main_process():
                resume_dirs.clear()
    except (InputError, FileNotFoundError) as error:
        log.error("%s", error)
        sys.exit(1)
    finally:
        if (distributed := loaded_distributed()) is not None:
            distributed.cleanup()
    if getattr(main, "__module__", None) == "__main__":
        gc.freeze()
