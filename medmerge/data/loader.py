"""Batches straight from memory-mapped uint8 arrays; normalisation and augmentation run batched on the device.

The prepared images are small uint8 arrays, so per-sample work in worker processes costs more than it
saves: a batch is gathered by fancy indexing, moved to the device as uint8 (4x less traffic than float)
and converted, normalised and flipped there in one go. A split that fits in a fraction of a GPU's free
memory (:func:`place_on_device`) is copied there once, and its batches are gathered on the GPU.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from medmerge.device import Runtime


@dataclass
class ArrayBatches:
    """Iterates ``(images uint8 NHWC, labels int64)`` batches over arrays, reshuffled every epoch.

    With ``world_size > 1`` (multi-process training) each process iterates only its own shard: every
    process draws the same permutation for an epoch (same ``seed``), cuts it into the same *global*
    batches of ``(batch_size // world_size) * world_size`` samples, and process ``rank`` takes the
    ``rank``-th of ``world_size`` equal, contiguous slices of each. So the global batch stays
    ``batch_size`` (rounded down to a multiple of ``world_size``), the shards of an epoch are disjoint and
    of equal size, and every process takes the same number of steps. A last, partial global batch is cut
    to a multiple of ``world_size`` (dropping fewer than ``world_size`` samples that epoch).

    ``workers`` background threads gather the next batches while the model trains (gathering from a
    memory map is a copy that releases the GIL, so threads suffice); ``pin_memory`` pins each batch for an
    asynchronous copy to a GPU. With ``device_images`` (a copy of ``images`` on a device, see
    :meth:`on_device`) the images of a batch are gathered there instead, and neither is needed. The order
    and content of the batches do not depend on any of them; labels always come from ``labels``.
    """

    images: np.ndarray
    labels: np.ndarray
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    pin_memory: bool = False
    device_images: Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not one of world_size {self.world_size} processes")
        if self.batch_size < self.world_size:
            raise ValueError(
                f"batch size {self.batch_size} cannot be split over {self.world_size} processes; "
                "use a batch size of at least device.processes"
            )
        self._epoch = 0

    @property
    def global_batch_size(self) -> int:
        """Samples per step over all processes: ``batch_size`` rounded down to a multiple of ``world_size``."""
        return self.batch_size - self.batch_size % self.world_size

    def state_dict(self) -> dict[str, int]:
        """What decides the next epoch's order besides the settings: the number of epochs drawn so far."""
        return {"epoch": self._epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch = int(state["epoch"])

    def on_device(self, device: torch.device) -> ArrayBatches:
        """The same batches, with the images held on ``device`` (one copy of the split) and gathered there."""
        images = torch.from_numpy(np.ascontiguousarray(self.images)).to(device)
        return replace(self, device_images=images, workers=0, pin_memory=False)

    def in_order(self, batch_size: int) -> ArrayBatches:
        """Every sample once, unshuffled, in batches of ``batch_size`` (on the same device as these)."""
        return replace(self, batch_size=batch_size, shuffle=False, drop_last=False, rank=0, world_size=1)

    @property
    def nbytes(self) -> int:
        """Bytes of the images (what :meth:`on_device` copies)."""
        return int(self.images.nbytes)

    def shard(self, rank: int, world_size: int) -> ArrayBatches:
        """The same data and order, iterated as process ``rank`` of ``world_size``."""
        sharded = replace(self, rank=rank, world_size=world_size)
        sharded._epoch = self._epoch
        return sharded

    def _global_batches(self, count: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of each global batch over an epoch's order (each a multiple of world_size)."""
        size = self.global_batch_size
        stop = count - count % size if (self.drop_last and count >= size) else count
        bounds = []
        for start in range(0, stop, size):
            end = min(start + size, stop)
            end -= (end - start) % self.world_size
            if end > start:
                bounds.append((start, end))
        return bounds

    def __len__(self) -> int:
        return len(self._global_batches(len(self.images)))

    def _epoch_indices(self) -> list[np.ndarray]:
        """This process's sample indices for each batch of the next epoch."""
        count = len(self.images)
        if self.shuffle:
            order = np.random.default_rng((self.seed, self._epoch)).permutation(count)
        else:
            order = np.arange(count)
        self._epoch += 1
        batches = []
        for start, stop in self._global_batches(count):
            per_rank = (stop - start) // self.world_size
            first = start + self.rank * per_rank
            batches.append(order[first : first + per_rank])
        return batches

    def _gather(self, index: np.ndarray) -> tuple[Tensor, Tensor]:
        labels = torch.from_numpy(np.asarray(self.labels[index], dtype=np.int64))
        if self.device_images is not None:
            positions = torch.from_numpy(np.asarray(index, dtype=np.int64)).to(self.device_images.device)
            return self.device_images.index_select(0, positions), labels
        images = torch.from_numpy(np.ascontiguousarray(self.images[index]))
        if self.pin_memory:
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices = self._epoch_indices()
        if self.workers <= 0 or self.device_images is not None:
            yield from map(self._gather, indices)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="medmerge-batches") as pool:
            pending: deque = deque()
            for index in indices:
                pending.append(pool.submit(self._gather, index))
                if len(pending) > 2 * self.workers:  # bounded prefetch
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def device_free_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device; 0 elsewhere (on the CPU the memory map already is the cache)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.mem_get_info(device)[0])


def place_on_device(
    splits: Sequence[ArrayBatches], device: torch.device, fraction: float, free_bytes: int | None = None
) -> list[ArrayBatches]:
    """Each split held on ``device`` while all held so far fit in ``fraction`` of its free memory, in order.

    ``free_bytes`` defaults to what the device reports (:func:`device_free_bytes`: nothing on the CPU, where
    splits stay memory-mapped). A split that does not fit stays on the host, as do those after it.
    """
    budget = fraction * (device_free_bytes(device) if free_bytes is None else free_bytes)
    placed, used, fits = [], 0, True
    for split in splits:
        fits = fits and budget > 0 and used + split.nbytes <= budget
        if fits:
            used += split.nbytes
        placed.append(split.on_device(device) if fits and split.device_images is None else split)
    return placed


class DeviceTransform:
    """uint8 NHWC batch -> normalised float NCHW on the runtime's device, with optional random flips.

    As a shard (``shard(rank, world_size)``, for a batch from a sharded ``ArrayBatches``) every process
    draws the flips of the whole global batch from the same seeded stream and applies its own slice, so
    the augmentation is the one a single process would apply to the global batch.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], runtime: Runtime, seed: int = 0) -> None:
        self.runtime = runtime
        self.mean = torch.tensor(mean, device=runtime.device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=runtime.device).view(1, -1, 1, 1) * 255.0
        self.generator = torch.Generator(device=runtime.device).manual_seed(seed)
        self.rank, self.world_size = 0, 1

    def state_dict(self) -> dict[str, Tensor]:
        """The augmentation stream's position (a resumed run draws the same flips)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def shard(self, rank: int, world_size: int) -> DeviceTransform:
        """A view for process ``rank`` of ``world_size`` (sharing this transform's random stream)."""
        view = copy.copy(self)
        view.rank, view.world_size = rank, world_size
        return view

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
        n = x.shape[0]
        draws = torch.rand(n * self.world_size, device=x.device, generator=self.generator)
        mask = draws[self.rank * n : (self.rank + 1) * n] < 0.5
        return torch.where(mask.view(-1, 1, 1, 1), x.flip(dim), x)
