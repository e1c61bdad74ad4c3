"""What every stage script shares: logging, reading params, the seed argument, and turning bad input into a
clear exit."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medmerge.config import ConfigError, Params, flatten, load_params
from medmerge.io import atomic_directory
from medmerge.tracking import repo_root

if TYPE_CHECKING:
    from types import ModuleType

    from medmerge.data.target import TargetData
    from medmerge.device import Runtime
    from medmerge.resume import ResumeDir

log = logging.getLogger("medmerge.stage")

#: where training stages keep their resume checkpoints, under the repository root (git- and DVC-ignored)
RESUME_ROOT = Path(".medmerge") / "resume"
_resume_dirs: list[ResumeDir] = []  # this process's, removed by run() when the stage succeeds


def _distributed() -> ModuleType | None:
    """``medmerge.distributed`` once this process has imported torch (a process group needs it), else None:
    the stages that never use torch (``fetch_data``, ``prepare``) start without paying for its import."""
    if "torch" not in sys.modules:
        return None
    from medmerge import distributed

    return distributed


def _is_main() -> bool:
    distributed = _distributed()
    return distributed.is_main() if distributed else int(os.environ.get("RANK") or 0) == 0


def input_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's files or params: reported as one clear line, not a traceback."""
    from medmerge.data.npz import DataError
    from medmerge.merge.alignment import AlignmentError
    from medmerge.merge.coefficients import GranularityError
    from medmerge.merge.functional import SourceMismatchError
    from medmerge.models.checkpoint import CheckpointError
    from medmerge.models.factory import StateDictMismatchError
    from medmerge.models.origins import OriginError, WeightsUnavailableError

    return (ConfigError, DataError, CheckpointError, SourceMismatchError, AlignmentError, StateDictMismatchError, OriginError,
            WeightsUnavailableError, FileNotFoundError, GranularityError)


def setup_logging() -> None:
    """INFO (or ``MEDMERGE_LOG_LEVEL``) in the main process; only warnings from the other ranks of a
    multi-process run, so each message appears once."""
    level = os.environ.get("MEDMERGE_LOG_LEVEL", "INFO") if _is_main() else "WARNING"
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stage_params() -> tuple[Params, dict]:
    """The validated params and their flattened dotted form (for MLflow)."""
    params = load_params()
    return params, flatten(params.model_dump(mode="json"))


def stage_runtime(params: Params) -> Runtime:
    """The device, precision and layout that ``params.device`` asks for; on the CPU its kernels and threads
    (``device.cpu_kernels``, ``device.cpu_threads``: :func:`medmerge.device.hold_cpu_kernels`), so a stage
    calls it before its first tensor operation. ``Runtime.compute`` says what the stage trains with.

    In a process started by torchrun this also joins the process group (``medmerge.distributed.init``)
    and gives the process its own GPU.
    """
    import torch

    from medmerge import distributed
    from medmerge.device import hold_cpu_kernels, resolve_runtime

    settings = params.device
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if settings.type == "auto" else settings.type
    compute = None
    if kind == "cpu":  # before any tensor operation: the kernel libraries choose their code paths once
        # under torchrun each worker keeps the threads torchrun's launcher gave it (maybe_relaunch)
        threads = thread_override() or (0 if distributed.launched() else settings.cpu_threads)
        compute = hold_cpu_kernels(settings.cpu_kernels, threads)
    if distributed.launched():  # join first: set_device must precede any CUDA query (or all use GPU 0)
        distributed.init(kind)
    runtime = resolve_runtime(settings.type, settings.mixed_precision, settings.channels_last, settings.compile)
    device = distributed.device_for(runtime.device)
    if compute is None:
        compute = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    log.info("training with %s", compute)
    return dataclasses.replace(runtime, device=device, compute=compute)


def torchrun_command(processes: int, module: str, argv: Sequence[str], nodes: int = 1, rdzv_endpoint: str = "",
                     rdzv_id: str = "medmerge") -> list[str]:
    """``python -m torch.distributed.run`` for ``processes`` workers (per node) each running ``python -m module
    argv``. One node: ``--standalone`` (a free local port). Several: torchrun's c10d rendezvous at
    ``rdzv_endpoint``, which every node's torchrun joins with the same ``rdzv_id``."""
    if nodes <= 1:
        launch = ["--standalone", f"--nproc_per_node={processes}"]
    else:
        launch = [f"--nnodes={nodes}", f"--nproc_per_node={processes}", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", module, *argv]


def maybe_relaunch(params: Params, module: str, argv: Sequence[str]) -> None:
    """With ``device.processes > 1`` or ``device.nodes > 1``, re-run this stage as ``module`` under torchrun and
    exit with its code.

    Does nothing for one process on one node, or inside a process that torchrun started. On one node
    ``--standalone`` picks a free port, so concurrent experiments (``dvc queue start -j 2``) do not collide;
    several nodes meet at ``device.rdzv_endpoint`` (every node runs the same stage, docs/multi_gpu.md). On the
    CPU each worker gets ``cores / processes`` threads unless ``OMP_NUM_THREADS`` or ``MEDMERGE_THREADS`` say
    otherwise.
    """
    from medmerge import distributed

    device = params.device
    processes, nodes = device.processes, getattr(device, "nodes", 1)
    if (processes <= 1 and nodes <= 1) or distributed.launched():
        return
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    command = torchrun_command(processes, module, argv, nodes, getattr(device, "rdzv_endpoint", ""),
                               getattr(device, "rdzv_id", "medmerge"))
    log.info("device.processes = %d, device.nodes = %d: %s", processes, nodes, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(subprocess.call(command, env=env))


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    """``--seed N``: the one seed a per-seed stage runs (``dvc.yaml`` passes each of ``params.yaml`` seeds)."""
    parser.add_argument("--seed", type=int, required=True, help="the seed of this run (one of params.yaml seeds)")


def stage_dataset(params: Params, dataset: str, batch_size: int, runtime: Runtime, seed: int) -> TargetData:
    """A prepared dataset's splits, batched with the loader settings of ``params.data``; the training split
    is shuffled with ``seed``. On a GPU the splits that fit in ``data.device_cache_fraction`` of its free
    memory are held there."""
    from medmerge import layout
    from medmerge.data.target import open_dataset

    on_gpu = runtime.device.type == "cuda"
    pin = params.data.pin_memory == "on" or (params.data.pin_memory == "auto" and on_gpu)
    # a split that does not fit on the GPU is gathered by prefetch threads into pinned memory
    workers = params.data.loader_workers or (2 if on_gpu else 0)
    return open_dataset(layout.processed_dir(dataset), batch_size, params.evaluate.batch_size,
                        seed, workers=workers, pin_memory=pin,
                        device=runtime.device, device_cache_fraction=params.data.device_cache_fraction)


def stage_identity() -> str:
    """The running stage as a file name: ``DVC_STAGE`` under DVC, else the script's name and arguments."""
    name = os.environ.get("DVC_STAGE") or " ".join([Path(sys.argv[0]).stem, *sys.argv[1:]])
    return re.sub(r"[^A-Za-z0-9@.=-]+", "_", name).strip("_.") or "stage"


def stage_resume(params: Params) -> ResumeDir:
    """Where this stage's fits keep their per-epoch resume checkpoints (``fit(resume=...)``):
    ``<repo>/.medmerge/resume/<stage>-<hash of the params>/``, outside every declared out.

    The repository root is ``DVC_ROOT``, so a stage of ``dvc exp run --temp`` or ``--queue`` finds its
    checkpoints again after a crash, and two experiments with different params never share a directory.
    Inside it, each fit's file is named by a fingerprint of that fit's inputs (initial weights, data, seeds,
    settings: :func:`medmerge.resume.fit_fingerprint`), so changed input directories start afresh.
    :func:`run` removes the directory when the stage succeeds.
    """
    from medmerge.resume import ResumeDir

    digest = hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    directory = ResumeDir(repo_root() / RESUME_ROOT / f"{stage_identity()}-{digest[:12]}")
    if directory not in _resume_dirs:
        _resume_dirs.append(directory)
    return directory


def clear_resume_checkpoints() -> None:
    """Remove the resume checkpoints of this process's stage (it succeeded) and the folders left empty."""
    while _resume_dirs:
        directory = _resume_dirs.pop()
        directory.clear()
        for parent in (directory.path.parent, directory.path.parent.parent):
            with contextlib.suppress(OSError):  # not empty: another stage's checkpoints
                parent.rmdir()


def model_input(arch: str, dataset: str) -> dict:
    """The preprocessing of a model trained on the prepared ``dataset``, for its card: the image size and
    resize policy its ``meta.json`` records, the normalisation of ``arch`` (see ``medmerge.models.input_card``)."""
    from medmerge import layout
    from medmerge.data.prepare import read_meta
    from medmerge.models import input_card

    meta = read_meta(layout.processed_dir(dataset))
    return input_card(arch, meta["image_size"], meta.get("resize", "squash"))


@contextlib.contextmanager
def stage_output(out_dir: Path) -> Iterator[Path]:
    """Where a stage writes ``out_dir``: atomically replaced on success, in the main process only.

    The other processes of a multi-process run compute the same results; they write to a scratch directory
    that is thrown away.
    """
    if _is_main():
        with atomic_directory(out_dir) as temp:
            yield temp
    else:
        with tempfile.TemporaryDirectory(prefix="medmerge-rank-") as scratch:
            yield Path(scratch)


def run(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; a bad input exits 1 with its message instead of a traceback.

    In a multi-process run every process waits for the others (rank 0 writes the outputs) before leaving
    the process group. Once the stage has succeeded, its resume checkpoints (:func:`stage_resume`) are
    removed; a failed or killed stage keeps them for its rerun. A stage run as a script then ends without
    the interpreter's teardown (:func:`exit_without_teardown`).
    """
    setup_logging()
    limit_threads()
    try:
        main()
        if (distributed := _distributed()) is not None:
            distributed.barrier()
        if _is_main():
            clear_resume_checkpoints()
    except input_errors() as error:
        log.error("%s", error)
        sys.exit(1)
    finally:
        if (distributed := _distributed()) is not None:
            distributed.cleanup()
    if getattr(main, "__module__", None) == "__main__":
        exit_without_teardown()


def exit_without_teardown(code: int = 0) -> None:
    """End a stage process that has finished its work, skipping the interpreter's teardown.

    Tearing down torch, timm and MLflow (about 4,500 modules) takes 1 to 3 s per process and writes nothing.
    What a normal exit does that matters still happens first, in the interpreter's order: threading's exit
    hooks (which stop idle ``ThreadPoolExecutor`` workers, such as those MLflow's HTTP artifact repository
    keeps), then the join of every other non-daemon thread, then the ``atexit`` handlers (logging and MLflow
    flush and close), and stdout and stderr are flushed. Joining an idle pool worker before its hook has run
    would wait forever. :func:`run` calls it only for a stage run as a script (``python -m stages.<name>``),
    never for a ``main`` called in-process.
    """
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)  # what Py_Finalize calls first (CPython 3.4 to 3.14)
    if shutdown is not None:
        shutdown()
    else:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def thread_override() -> int | None:
    """The torch thread count ``MEDMERGE_THREADS`` asks for (it overrides ``device.cpu_threads``), or None."""
    threads = os.environ.get("MEDMERGE_THREADS")
    return max(1, int(threads)) if threads else None


def limit_threads() -> None:
    """``MEDMERGE_THREADS=N``: torch's intra-op threads (via ``OMP_NUM_THREADS`` if torch is not imported yet)."""
    count = thread_override()
    if count is None:
        return
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)
    else:
        os.environ["OMP_NUM_THREADS"] = str(count)
