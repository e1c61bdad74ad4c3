"""What every stage script shares: logging, reading params, and turning bad input into a clear exit."""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable

import numpy as np
import torch

from medmerge.config import ConfigError, Params, flatten, load_params
from medmerge.device import Runtime, resolve_runtime

log = logging.getLogger("medmerge.stage")


def input_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's files or params: reported as one clear line, not a traceback."""
    from medmerge.data.npz import DataError
    from medmerge.merge.functional import SourceMismatchError
    from medmerge.models.checkpoint import CheckpointError

    return ConfigError, DataError, CheckpointError, SourceMismatchError, FileNotFoundError


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("MEDMERGE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stage_params() -> tuple[Params, dict]:
    """The validated params and their flattened dotted form (for MLflow)."""
    params = load_params()
    return params, flatten(params.model_dump(mode="json"))


def stage_runtime(params: Params) -> Runtime:
    """The device, precision and layout that ``params.device`` asks for."""
    settings = params.device
    return resolve_runtime(settings.type, settings.mixed_precision, settings.channels_last, settings.compile)


def run(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; a bad input exits 1 with its message instead of a traceback."""
    setup_logging()
    torch.set_num_threads(max(1, int(os.environ.get("MEDMERGE_THREADS", torch.get_num_threads()))))
    try:
        main()
    except input_errors() as error:
        log.error("%s", error)
        sys.exit(1)
