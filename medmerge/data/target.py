"""A prepared dataset opened for training: its splits as batch iterators over memory maps, and its classes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from medmerge.data.loader import ArrayBatches, place_on_device
from medmerge.data.prepare import load_split, read_meta

log = logging.getLogger("medmerge.data.target")


def inverse_frequency_weights(labels: np.ndarray, num_classes: int) -> Tensor:
    """Per-class loss weights ``n / (K * n_k)`` (1 for a balanced set); absent classes get weight 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.divide(counts.sum(), num_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class TargetData:
    """A prepared dataset's splits as batch iterators plus its class names."""

    train: ArrayBatches
    val: ArrayBatches
    test: ArrayBatches
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_weights(self) -> Tensor:
        """Inverse-frequency loss weights from the training split."""
        return inverse_frequency_weights(self.train.labels, self.num_classes)

    def with_train_batch_size(self, batch_size: int) -> TargetData:
        """The same splits (device copies included), the training split in batches of ``batch_size``, from
        its first epoch: what :func:`open_dataset` with that batch size gives, without opening it again."""
        train = replace(self.train, batch_size=batch_size, drop_last=_drops_last(len(self.train.labels), batch_size))
        return replace(self, train=train)


def _drops_last(count: int, batch_size: int) -> bool:
    """A training split of ``count`` samples, larger than one batch, drops its last partial batch each epoch."""
    return count > batch_size


def open_dataset(
    prepared_dir: Path,
    batch_size: int,
    eval_batch_size: int = 256,
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    device: torch.device | None = None,
    device_cache_fraction: float = 0.0,
) -> TargetData:
    """Memory-map a prepared dataset; the training split is shuffled every epoch. With ``device`` the splits
    that fit in ``device_cache_fraction`` of its free memory are held there (``place_on_device``)."""
    meta = read_meta(prepared_dir)
    splits = {name: load_split(prepared_dir, name) for name in ("train", "val", "test")}
    io = {"workers": workers, "pin_memory": pin_memory}
    batches = [
        ArrayBatches(*splits["train"], batch_size=batch_size, shuffle=True, seed=seed,
                     drop_last=_drops_last(len(splits["train"][1]), batch_size), **io),
        ArrayBatches(*splits["val"], batch_size=eval_batch_size, **io),
        ArrayBatches(*splits["test"], batch_size=eval_batch_size, **io),
    ]
    if device is not None:
        batches = place_on_device(batches, device, device_cache_fraction)
        held = [name for name, b in zip(("train", "val", "test"), batches, strict=True) if b.device_images is not None]
        if held:
            log.info("holding the %s split(s) of %s on %s", "/".join(held), prepared_dir.name, device)
    return TargetData(*batches, classes=list(meta["classes"]))
