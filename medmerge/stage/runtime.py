"""Where and how a stage computes: the seed, the device and its threads, the process group of a
multi-process run (and the torchrun relaunch that starts one), and the batched target dataset."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

    from medmerge.config import Params
    from medmerge.data.target import TargetData
    from medmerge.device import Runtime

log = logging.getLogger("medmerge.stage")


def loaded_distributed() -> ModuleType | None:
    """``medmerge.distributed`` once this process has imported torch (a process group needs it), else None:
    the stages that never use torch (``fetch_data``, ``prepare``) start without paying for its import."""
    if "torch" not in sys.modules:
        return None
    from medmerge import distributed

    return distributed


def is_main_process() -> bool:
    """Rank 0 of a multi-process run, or the only process."""
    distributed = loaded_distributed()
    return distributed.is_main() if distributed else int(os.environ.get("RANK") or 0) == 0


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        if settings.cpu_depthwise_grad == "taps":
            compute += ", small-map depthwise weight gradients by taps"
    if distributed.launched():  # join first: set_device must precede any CUDA query (or all use GPU 0)
        distributed.init(kind)
    runtime = resolve_runtime(settings.type, settings.mixed_precision, settings.channels_last, settings.compile)
    device = distributed.device_for(runtime.device)
    if compute is None:
        compute = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    log.info("training with %s", compute)
    return dataclasses.replace(runtime, device=device, compute=compute,
                               depthwise_taps=device.type == "cpu" and settings.cpu_depthwise_grad == "taps")


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
