"""Batches straight from memory-mapped uint8 arrays; normalisation and augmentation run batched on the device.

The prepared images are small uint8 arrays, so per-sample work in worker processes costs more than it
saves: a batch is gathered by fancy indexing, moved to the device as uint8 (4x less traffic than float)
and converted, normalised and flipped there in one go.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medmerge.device import Runtime


@dataclass
class ArrayBatches:
    """Iterates ``(images uint8 NHWC, labels int64)`` batches over arrays, reshuffled every epoch."""

    images: np.ndarray
    labels: np.ndarray
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self._epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(len(self.images), self.batch_size)
        return full if (self.drop_last and full) else full + bool(rest)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        count = len(self.images)
        if self.shuffle:
            order = np.random.default_rng((self.seed, self._epoch)).permutation(count)
        else:
            order = np.arange(count)
        self._epoch += 1
        stop = count - count % self.batch_size if (self.drop_last and count >= self.batch_size) else count
        for start in range(0, stop, self.batch_size):
            index = order[start : start + self.batch_size]
            images = torch.from_numpy(np.ascontiguousarray(self.images[index]))
            yield images, torch.from_numpy(np.asarray(self.labels[index], dtype=np.int64))


class DeviceTransform:
    """uint8 NHWC batch -> normalised float NCHW on the runtime's device, with optional random flips."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], runtime: Runtime, seed: int = 0) -> None:
        self.runtime = runtime
        self.mean = torch.tensor(mean, device=runtime.device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=runtime.device).view(1, -1, 1, 1) * 255.0
        self.generator = torch.Generator(device=runtime.device).manual_seed(seed)

    def __call__(self, images: Tensor, augment: bool = False) -> Tensor:
        x = images.to(self.runtime.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        if augment:
            x = self._flip(x, dim=3)
            x = self._flip(x, dim=2)
        memory_format = torch.channels_last if self.runtime.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format)

    def _flip(self, x: Tensor, dim: int) -> Tensor:
        """Flip a random half of the batch along ``dim`` (lesions have no canonical orientation)."""
        mask = torch.rand(x.shape[0], device=x.device, generator=self.generator) < 0.5
        return torch.where(mask.view(-1, 1, 1, 1), x.flip(dim), x)
