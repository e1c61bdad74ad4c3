"""Batches from memory maps and the device transform."""

from __future__ import annotations

import numpy as np
import torch

from medmerge.data.loader import ArrayBatches, DeviceTransform
from medmerge.device import resolve_runtime


def test_batches_cover_every_sample_once_and_reshuffle() -> None:
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    labels = np.arange(10)
    batches = ArrayBatches(images, labels, batch_size=4, shuffle=True, seed=1)
    first = torch.cat([y for _, y in batches]).tolist()
    second = torch.cat([y for _, y in batches]).tolist()
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert len(ArrayBatches(images, labels, 4, drop_last=True)) == 2
    assert [len(y) for _, y in ArrayBatches(images, labels, 4, drop_last=True)] == [4, 4]
    x, y = next(iter(ArrayBatches(images, labels, 3)))
    assert x.dtype == torch.uint8 and torch.equal(x[1], torch.from_numpy(images[1])) and y.tolist() == [0, 1, 2]


def test_device_transform_normalises_and_flips() -> None:
    runtime = resolve_runtime("cpu", "none", "on")
    transform = DeviceTransform([0.5] * 3, [0.5] * 3, runtime)
    images = torch.zeros(8, 4, 4, 3, dtype=torch.uint8)
    images[:, :, 0, :] = 255  # left column white
    x = transform(images)
    assert x.shape == (8, 3, 4, 4) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.all(x[:, :, :, 0] == 1.0) and torch.all(x[:, :, :, 1] == -1.0)
    flipped = transform(images, augment=True)
    assert sorted(torch.unique(flipped).tolist()) == [-1.0, 1.0]
    assert not torch.equal(flipped, x) or not torch.equal(transform(images, augment=True), x)


def test_background_workers_yield_the_same_batches_in_order() -> None:
    images = np.arange(37 * 2 * 2 * 3, dtype=np.uint8).reshape(37, 2, 2, 3)
    labels = np.arange(37)
    plain = ArrayBatches(images, labels, batch_size=5, shuffle=True, seed=4)
    threaded = ArrayBatches(images, labels, batch_size=5, shuffle=True, seed=4, workers=2)
    for _ in range(2):  # two epochs: the reshuffle is the same too
        expected = [(x.clone(), y.clone()) for x, y in plain]
        actual = list(threaded)
        assert len(actual) == len(expected) == 8
        for (x, y), (ex, ey) in zip(actual, expected, strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)
