"""Prepared splits held on the device: which splits are placed there, and that their batches equal the
host path's (tested with the CPU as the device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmerge.data.loader import ArrayBatches, device_free_bytes, place_on_device
from medmerge.data.target import open_dataset
from medmerge.device import Runtime

CPU = torch.device("cpu")


def split(count: int, seed: int = 0, size: int = 8) -> ArrayBatches:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return ArrayBatches(images, rng.integers(0, 4, count), batch_size=6, shuffle=True, seed=3, drop_last=True)


def epochs(batches: ArrayBatches, count: int = 2) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    return [[(images.cpu().numpy(), labels.numpy()) for images, labels in batches] for _ in range(count)]


@pytest.mark.parametrize("world", [1, 2])
def test_batches_gathered_on_the_device_equal_the_host_batches(world: int) -> None:
    host = split(40)
    device = host.on_device(CPU)
    assert device.device_images is not None and host.device_images is None
    for rank in range(world):
        a, b = (x.shard(rank, world) if world > 1 else x for x in (host, device))
        for epoch_a, epoch_b in zip(epochs(a), epochs(b), strict=True):
            assert len(epoch_a) == len(epoch_b) > 0
            for (images_a, labels_a), (images_b, labels_b) in zip(epoch_a, epoch_b, strict=True):
                np.testing.assert_array_equal(images_a, images_b)
                np.testing.assert_array_equal(labels_a, labels_b)
    in_order = device.in_order(16)
    assert in_order.device_images is device.device_images and not in_order.shuffle
    np.testing.assert_array_equal(np.concatenate([i.numpy() for i, _ in in_order]), host.images)


def test_splits_are_placed_in_order_while_they_fit_in_the_fraction() -> None:
    train, val, test = split(40), split(20, 1), split(20, 2)
    nbytes = train.nbytes
    assert nbytes == 40 * 8 * 8 * 3
    free = 4 * nbytes
    placed = place_on_device([train, val, test], CPU, fraction=0.5, free_bytes=free)  # budget: 2 x train
    assert [b.device_images is not None for b in placed] == [True, True, True]  # 1 + 0.5 + 0.5 train
    placed = place_on_device([train, val, test], CPU, fraction=0.45, free_bytes=free)  # 1.8 x train
    assert [b.device_images is not None for b in placed] == [True, True, False]
    placed = place_on_device([train, val, test], CPU, fraction=0.2, free_bytes=free)  # train does not fit
    assert [b.device_images is not None for b in placed] == [False, False, False]
    assert place_on_device([train], CPU, fraction=0.0, free_bytes=free)[0].device_images is None


def test_on_the_cpu_splits_stay_memory_mapped(tmp_path) -> None:
    """Without a GPU nothing is copied: the memory map is already the cache (CPU behaviour as before)."""
    assert device_free_bytes(CPU) == 0
    assert place_on_device([split(40)], CPU, fraction=1.0)[0].device_images is None
    from medmerge.data import generate_synthetic, load_npz, prepare_dataset, save_npz_atomic

    arrays = generate_synthetic("lesions", n_train=12, n_val=4, n_test=4, image_size=16, seed=0)
    save_npz_atomic(tmp_path / "raw.npz", arrays)
    prepare_dataset(load_npz(tmp_path / "raw.npz"), 16, tmp_path / "prepared")
    data = open_dataset(tmp_path / "prepared", 4, device=Runtime(CPU).device, device_cache_fraction=1.0)
    assert all(b.device_images is None for b in (data.train, data.val, data.test))
    assert isinstance(data.train.images, np.memmap)
