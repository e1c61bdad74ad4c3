"""Data-scarcity studies: a deterministic, stratified, patient-grouped subset of the training split.

``train_fraction`` keeps about that fraction of every class, ``n_train_per_class`` about that many
images of every class (all of a class that has fewer). Whole groups (patients) are taken in an order
shuffled by ``seed``, a group as long as one of its classes is still short of its target, so every
class keeps at least one image and no patient is split. With one image per group the counts are exact
and a smaller subset is contained in a larger one of the same seed (a learning curve adds images).
"""

from __future__ import annotations

import math

import numpy as np

from medmerge.data.npz import DataError


def class_targets(
    counts: np.ndarray, fraction: float | None = None, per_class: int | None = None
) -> np.ndarray:
    """Images wanted per class: ``ceil(fraction * n)`` or ``min(per_class, n)``, at least 1 where n > 0."""
    if (fraction is None) == (per_class is None):
        raise DataError("give exactly one of train_fraction and n_train_per_class")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise DataError(f"train_fraction must be in (0, 1], got {fraction!r}")
        wanted = np.array([math.ceil(fraction * n - 1e-9) for n in counts])
    else:
        if per_class < 1:
            raise DataError(f"n_train_per_class must be at least 1, got {per_class!r}")
        wanted = np.minimum(counts, per_class)
    return np.where(counts > 0, np.maximum(wanted, 1), 0)


def subsample_train(
    labels: np.ndarray,
    groups: np.ndarray,
    num_classes: int,
    *,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sorted indices of the kept training images (see the module docstring)."""
    labels = np.asarray(labels)
    targets = class_targets(np.bincount(labels, minlength=num_classes), fraction, per_class)
    unique, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    members: list[list[int]] = [[] for _ in unique]
    for i, g in enumerate(inverse):
        members[g].append(i)
    taken = np.zeros(num_classes, dtype=np.int64)
    keep: list[int] = []
    for g in order:
        group_labels = labels[members[g]]
        if (taken[group_labels] < targets[group_labels]).any():
            keep += members[g]
            np.add.at(taken, group_labels, 1)
        if (taken >= targets).all():
            break
    return np.sort(np.array(keep, dtype=np.int64))
