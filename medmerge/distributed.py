"""Multi-process (DDP) training glue: the process group, this process's rank, and the few collectives the
fit loop needs. Every function is a no-op (or answers for one process) when not running distributed.

A run is distributed when it was started by ``torchrun`` (``torch.distributed.run``) with more than one
process: torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and
``init`` joins the group from them. The stages start torchrun themselves when ``device.processes > 1``
(``medmerge.stage.maybe_relaunch``); docs/multi_gpu.md describes what is split across processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("medmerge.distributed")

#: set by torchrun in each worker; its absence means "not started by torchrun"
LAUNCHER_ENV = "LOCAL_RANK"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets ``LOCAL_RANK``)."""
    return LAUNCHER_ENV in os.environ


def is_distributed() -> bool:
    """Whether a process group of more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes outputs, logs to MLflow and shows progress."""
    return rank() == 0


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init(device_type: str = "cpu") -> bool:
    """Join the process group that torchrun described in the environment; True if now distributed.

    A no-op (False) for a single process. On CUDA each process uses GPU ``LOCAL_RANK`` and NCCL; elsewhere
    gloo. Calling it again once initialised changes nothing.
    """
    if is_distributed():
        return True
    if _env_int("WORLD_SIZE", 1) <= 1 or not dist.is_available():
        return False
    backend = backend_for(device_type)
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if local_rank() >= count:
            raise RuntimeError(
                f"process with LOCAL_RANK {local_rank()} needs GPU {local_rank()} but torch sees {count}: "
                "device.processes must not exceed the GPUs on this machine"
            )
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    log.info("rank %d of %d (local rank %d), backend %s", rank(), world_size(), local_rank(), backend)
    return True


def device_for(device: torch.device) -> torch.device:
    """This process's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` when distributed."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (the values themselves for one process)."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """Element-wise mean of ``values`` over all processes."""
    return [v / world_size() for v in all_reduce_sum(values)] if is_distributed() else [float(v) for v in values]


def broadcast_floats(values: Sequence[float], src: int = 0) -> list[float]:
    """Rank ``src``'s ``values`` on every process, so decisions taken from them agree everywhere."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.broadcast(tensor, src=src)
    return tensor.cpu().tolist()


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every process.

    DDP broadcasts buffers at the start of each training forward, but each process then updates its own
    running statistics from its own shard; after an epoch they differ slightly, and validation must not.
    """
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when distributed, else ``model`` itself.

    Gradients of the parameters that require them are averaged over processes after each backward.
    Frozen parameters (a merge's sources) take no part; every trainable parameter must be used in the
    forward (``find_unused_parameters=False``).
    """
    if not is_distributed():
        return model
    device_ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)
