"""Multi-process (DDP) training: data sharding, the torchrun relaunch, rank-0-only tracking, and two gloo
processes on the CPU learning the same merge coefficients as one process.

Run as a script under torchrun (``python -m torch.distributed.run --nproc_per_node=2 tests/test_distributed.py
OUT``) this file is also the worker of ``test_two_processes_learn_the_single_process_coefficients``.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from medmerge import distributed
from medmerge.config import DeviceSettings, MergeSettings
from medmerge.data.loader import ArrayBatches, DeviceTransform
from medmerge.data.target import TargetData
from medmerge.device import Runtime
from medmerge.methods.medmerge import build_learned_merge, learn_kernel_weights
from medmerge.models import create_model

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
BATCH = 16  # global batch: 8 per process with 2 processes
# test_convnext has only LayerNorm: two processes must learn what one process learns from the same global
# batches. test_resnet has BatchNorm, which in training normalises with each process's own batch (8
# samples here, not 16): its reference is one process whose training forward normalises each half of the
# batch separately (``learn(..., bn_groups=2)``).
ARCHS = ("test_resnet", "test_convnext")
BN_GROUPS = {"test_resnet": 2, "test_convnext": 1}
# Largest |difference| allowed between the normalised coefficients (weights in [0, 1]) of the reference and
# of two processes. Measured (CPU, torch 2.14, 6 AdamW steps): test_convnext 1.2e-7 (2 float32 ulps: the
# gradient is summed over two half batches and all-reduced instead of over one batch), test_resnet 0.0
# (bit-identical). Rounding differences can grow through AdamW's division by sqrt(v) where a gradient is
# small, hence a margin well above the measured gap; it is still ~4000x below how far the coefficients
# move (0.039 for both), so a wrong shard, a missing gradient average or a misaligned flip fails the test.
# Against a plain single-process run test_resnet differs by 0.074 (more than it moves: after a few AdamW
# steps, different BatchNorm batches flip the sign of small gradients), so per-process BatchNorm is a real
# difference (docs/multi_gpu.md) and the comparison above is not vacuous.
TOLERANCE = 1e-5


# --------------------------------------------------------------------------------------------- sharding


def _rank_batches(count: int, batch_size: int, world: int, drop_last: bool, epochs: int = 2) -> list:
    """Per epoch, per rank: the sample ids of each batch (labels carry the ids)."""
    ids = np.arange(count)
    images = np.zeros((count, 2, 2, 3), dtype=np.uint8)
    per_rank = []
    for rank in range(world):
        batches = ArrayBatches(images, ids, batch_size, shuffle=True, seed=7, drop_last=drop_last)
        batches = batches.shard(rank, world) if world > 1 else batches
        assert len(batches) == len(ArrayBatches(images, ids, batch_size, drop_last=drop_last).shard(0, world))
        epochs_ids = [[labels.numpy() for _, labels in batches] for _ in range(epochs)]
        assert all(len(epoch) == len(batches) for epoch in epochs_ids)
        per_rank.append(epochs_ids)
    return [[[per_rank[r][e][s] for r in range(world)] for s in range(len(per_rank[0][e]))] for e in range(epochs)]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("count", [48, 50, 7])
@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_are_disjoint_equal_and_cover_the_global_batches(world: int, count: int, drop_last: bool) -> None:
    global_batch = BATCH - BATCH % world
    single = _rank_batches(count, global_batch, 1, drop_last)
    sharded = _rank_batches(count, BATCH, world, drop_last)
    for epoch_single, epoch_sharded in zip(single, sharded, strict=True):
        wholes = [whole for (whole,) in epoch_single]
        # only a last, partial global batch of fewer than `world` samples has no step of its own
        assert len(epoch_sharded) == len(wholes) - (len(wholes[-1]) < world)
        seen: list[int] = []
        for whole, shards in zip(wholes, epoch_sharded, strict=False):
            sizes = {len(shard) for shard in shards}
            assert len(sizes) == 1 and sizes != {0}, "every rank gets the same, non-zero number of samples"
            joined = np.concatenate(shards)
            # the ranks' shards, in rank order, are the single process's global batch (a last, partial
            # one cut to a multiple of world)
            np.testing.assert_array_equal(joined, whole[: len(whole) - len(whole) % world])
            seen.extend(joined.tolist())
        assert len(seen) == len(set(seen)), "shards are disjoint: no sample twice in an epoch"
        assert 0 <= sum(map(len, wholes)) - len(seen) < world, "shards cover the epoch but < world samples"


def test_shards_of_an_epoch_differ_between_epochs_but_not_between_identical_runs() -> None:
    first = _rank_batches(48, BATCH, 2, True, epochs=2)
    again = _rank_batches(48, BATCH, 2, True, epochs=2)
    np.testing.assert_array_equal(first[0][0][1], again[0][0][1])
    assert not np.array_equal(first[0][0][0], first[1][0][0])


def test_bad_shard_arguments_are_rejected() -> None:
    images, labels = np.zeros((8, 2, 2, 3), np.uint8), np.zeros(8, np.int64)
    with pytest.raises(ValueError, match="rank"):
        ArrayBatches(images, labels, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch size 2 cannot be split over 4"):
        ArrayBatches(images, labels, 2, world_size=4)


def test_sharded_flips_are_the_single_process_flips_of_the_global_batch() -> None:
    runtime = Runtime(torch.device("cpu"))
    batch = torch.randint(0, 256, (BATCH, 8, 8, 3), dtype=torch.uint8)
    whole = DeviceTransform([0.5] * 3, [0.5] * 3, runtime, seed=3)
    ranks = [DeviceTransform([0.5] * 3, [0.5] * 3, runtime, seed=3).shard(r, 2) for r in range(2)]
    for _ in range(3):  # several steps: the random streams stay aligned
        expected = whole(batch, augment=True)
        parts = [t(batch[r * 8 : (r + 1) * 8], augment=True) for r, t in enumerate(ranks)]
        torch.testing.assert_close(torch.cat(parts), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------- launching and rank-0 duties


def test_processes_setting_is_validated() -> None:
    assert DeviceSettings().processes == 1
    with pytest.raises(ValueError):
        DeviceSettings(processes=0)


def test_relaunch_runs_the_stage_module_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from medmerge.stage import runtime as stage

    calls = []
    monkeypatch.setattr(stage.subprocess, "call", lambda command, env: calls.append((command, env)) or 3)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    stage.maybe_relaunch(SimpleNamespace(device=SimpleNamespace(processes=1)), "stages.train", ["pretrain", "a"])
    assert calls == []
    with pytest.raises(SystemExit) as exit_info:
        stage.maybe_relaunch(SimpleNamespace(device=SimpleNamespace(processes=2)), "stages.train", ["pretrain", "a"])
    assert exit_info.value.code == 3
    command, env = calls[0]
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "stages.train", "pretrain", "a"]
    assert int(env["OMP_NUM_THREADS"]) >= 1
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a torchrun worker: no second launch
    stage.maybe_relaunch(SimpleNamespace(device=SimpleNamespace(processes=2)), "stages.train", [])
    assert len(calls) == 1


def test_only_rank_zero_creates_an_mlflow_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from medmerge.tracking import NullRun, stage_run

    monkeypatch.setenv("RANK", "1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with stage_run("learn_weights", "exp", {"a": 1}, uri) as tracker:
        assert isinstance(tracker, NullRun)
        tracker.log_metrics({"x": 1.0})
        tracker.log_epoch(SimpleNamespace(train_loss=1.0, val_loss=1.0, val_f1_macro=0.5, epoch=1))
    assert not (tmp_path / "mlflow.db").exists()


def test_helpers_are_no_ops_for_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.init("cpu")
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.all_reduce_mean([1.0, 3.0]) == [1.0, 3.0]
    assert distributed.broadcast_floats([2.0]) == [2.0]
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model
    distributed.barrier()
    distributed.cleanup()


# ---------------------------------------------------------------- one process vs two gloo processes


def _tiny_task() -> TargetData:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, n)

    train, val = split(96), split(24)
    return TargetData(
        train=ArrayBatches(*train, batch_size=BATCH, shuffle=True, seed=0, drop_last=True),
        val=ArrayBatches(*val, batch_size=64),
        test=ArrayBatches(*val, batch_size=64),
        classes=[f"c{i}" for i in range(NUM_CLASSES)],
    )


def _sources(arch: str) -> list[dict[str, torch.Tensor]]:
    sources = []
    for seed in range(2):
        torch.manual_seed(100 + seed)
        model = create_model(arch, num_classes=NUM_CLASSES)
        with torch.no_grad():  # distinct, non-trivial BN statistics per source
            for name, buffer in model.named_buffers():
                if buffer.is_floating_point():
                    buffer.uniform_(0.5, 1.5) if "var" in name else buffer.normal_(0, 0.1)
        sources.append(model.state_dict())
    return sources


def _settings() -> MergeSettings:
    return MergeSettings(anchor="a", epochs=1, batch_size=BATCH, lr=0.05, head_lr=1e-2)


def learn(arch: str, bn_groups: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The initial and learned coefficients of a 2-source merge (one epoch, 6 global steps, seed 0).

    ``bn_groups > 1``: each training forward runs the batch as that many equal, consecutive chunks, so
    BatchNorm normalises each chunk with its own statistics, as DDP processes do with their shards; the
    mean loss over the batch is then the mean of the chunks' mean losses, as DDP's averaged gradient is.
    """
    settings = _settings()
    merge = build_learned_merge(arch, _sources(arch), ["a", "b"], NUM_CLASSES, settings, seed=0)
    initial = merge.coefficient_tensors()
    if bn_groups > 1:
        whole_batch = merge.forward

        def chunked(x: torch.Tensor) -> torch.Tensor:
            if merge.training and torch.is_grad_enabled():
                return torch.cat([whole_batch(part) for part in x.chunk(bn_groups)])
            return whole_batch(x)

        merge.forward = chunked
    learn_kernel_weights(merge, arch, _tiny_task(), settings, Runtime(torch.device("cpu")), seed=0)
    return initial, merge.coefficient_tensors()


def _worker(out_dir: str) -> None:
    """One torchrun worker: join the gloo group from torchrun's environment, learn, rank 0 saves."""
    torch.set_num_threads(1)
    assert distributed.init("cpu") and distributed.world_size() == 2
    try:
        for arch in ARCHS:
            _, learned = learn(arch)
            if distributed.is_main():
                save_file(learned, str(Path(out_dir) / f"{arch}.safetensors"))
        distributed.barrier()
    finally:
        distributed.cleanup()


def _worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "MEDMERGE_LOG_LEVEL": "WARNING"}


@functools.cache
def _single_process(arch: str, bn_groups: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``learn`` in this process, with one thread like each worker (computed once for both tests)."""
    torch.set_num_threads(1)
    return learn(arch, bn_groups=bn_groups)


def _assert_learned_the_single_process_coefficients(out_dir: Path) -> None:
    """The coefficients two processes saved in ``out_dir`` are those of one process (see TOLERANCE)."""
    for arch in ARCHS:
        initial, single = _single_process(arch, BN_GROUPS[arch])
        two = load_file(str(out_dir / f"{arch}.safetensors"))
        assert single.keys() == two.keys() == initial.keys()
        gap = max(float((single[k] - two[k]).abs().max()) for k in single)
        moved = max(float((two[k] - initial[k]).abs().max()) for k in single)
        assert gap <= TOLERANCE, f"{arch}: one and two processes differ by {gap:.3g}"
        assert moved >= 1000 * TOLERANCE, f"{arch}: coefficients barely moved ({moved:.3g}); the test is void"
        if BN_GROUPS[arch] > 1:  # per-process BatchNorm statistics matter: the reference must model them
            _, plain = _single_process(arch, 1)
            assert max(float((plain[k] - two[k]).abs().max()) for k in plain) > 100 * TOLERANCE


@pytest.mark.slow
def test_two_processes_learn_the_single_process_coefficients(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).resolve()), str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=_worker_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_learned_the_single_process_coefficients(tmp_path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_several_nodes_use_the_c10d_rendezvous() -> None:
    from medmerge.stage.runtime import torchrun_command

    assert torchrun_command(4, "stages.train", ["ft", "a"])[3:6] == ["--standalone", "--nproc_per_node=4", "-m"]
    command = torchrun_command(4, "stages.train", ["ft", "a"], nodes=3, rdzv_endpoint="node0:29500", rdzv_id="x")
    assert command[1:] == ["-m", "torch.distributed.run", "--nnodes=3", "--nproc_per_node=4", "--rdzv-backend=c10d",
                           "--rdzv-endpoint=node0:29500", "--rdzv-id=x", "-m", "stages.train", "ft", "a"]
    assert DeviceSettings(nodes=2, rdzv_endpoint="10.0.0.1:29500").nodes == 2
    with pytest.raises(ValueError, match="device.rdzv_endpoint must be 'host:port'"):
        DeviceSettings(nodes=2)


@pytest.mark.slow
def test_two_nodes_learn_the_single_process_coefficients(tmp_path: Path) -> None:
    """Two torchrun agents, each a "node" with one gloo process, meet at a c10d rendezvous on 127.0.0.1 (the
    command ``device.nodes: 2`` builds) and learn what one process learns."""
    from medmerge.stage.runtime import torchrun_command

    command = torchrun_command(1, "tests.test_distributed", [str(tmp_path)], nodes=2,
                               rdzv_endpoint=f"127.0.0.1:{_free_port()}", rdzv_id=f"test-{os.getpid()}")
    nodes = [subprocess.Popen(command, cwd=REPO, env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    _assert_learned_the_single_process_coefficients(tmp_path)


if __name__ == "__main__":
    _worker(sys.argv[1])
