"""Train/val/test assignment for image datasets (stratified by label, grouped by patient).

Missing splits are carved out of the training pool with scikit-learn's ``StratifiedGroupKFold``
(shuffled with ``seed``): a fraction ``f`` becomes one of ``k = round(1 / f)`` folds, so the realised
fraction is about ``1 / k`` (0.15 -> 1/7 = 14.3 %) and no group (patient) is in two splits. The test
split is carved first (from the whole pool), then val from what is left (``val_fraction / (1 -
test_fraction)`` of it). Of the k folds, the first whose removal keeps every class of the pool in
the rest is taken, so every class with images stays in train.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from medmerge.data.manifest import manifest_path, write_manifest  # noqa: F401  (re-exported)
from medmerge.data.npz import SPLITS, DataError

log = logging.getLogger("medmerge.data")

#: folder name / CSV value (lower case) -> split
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def canonical_split(name: str) -> str | None:
    """``train``/``val``/``test`` for a split name or alias (case-insensitive), else None."""
    return SPLIT_ALIASES.get(name.strip().lower())


def check_fractions(val_fraction: float, test_fraction: float, where: str) -> None:
    """Both fractions in (0, 1) and together below 1."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise DataError(f"{where}: {name} must be in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"{where}: val_fraction + test_fraction = {val_fraction + test_fraction}; expected < 1 (train needs images)"
        )


def _keeps_all_classes(labels: np.ndarray, fold: np.ndarray) -> bool:
    rest = np.ones(len(labels), dtype=bool)
    rest[fold] = False
    return set(np.unique(labels[rest])) == set(np.unique(labels))


def carve(
    pool: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int, what: str
) -> np.ndarray:
    """Indices (a subset of ``pool``) of about ``fraction`` of its images, stratified and whole groups."""
    k = max(2, round(1.0 / fraction))
    n_groups = len(np.unique(groups[pool]))
    if n_groups < k:
        raise DataError(
            f"{what}: only {n_groups} group(s) to split, but a fraction of {fraction:.3g} takes 1 of {k} "
            f"folds and needs at least {k} groups; lower val_fraction/test_fraction or give the splits"
        )
    from sklearn.model_selection import (
        StratifiedGroupKFold,  # imported here: costly, and only fetching needs it
    )

    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            folds = [fold for _, fold in splitter.split(pool, labels[pool], groups[pool])]
        except ValueError as err:  # e.g. every class has fewer than k images
            raise DataError(
                f"{what}: cannot take 1 of {k} stratified folds ({err}); lower val_fraction/test_fraction, "
                "add images or give the splits"
            ) from None
    chosen = next((fold for fold in folds if _keeps_all_classes(labels[pool], fold)), folds[0])
    return pool[np.sort(chosen)]


def assign_splits(
    labels: np.ndarray,
    groups: np.ndarray,
    given: np.ndarray | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    where: str,
) -> np.ndarray:
    """Split name per image: ``given`` (None = all train) with missing val/test carved from train."""
    splits = np.full(len(labels), "train", dtype="<U5") if given is None else np.asarray(given, dtype="<U5")
    if not (splits == "train").any():
        raise DataError(f"{where}: no images are assigned to the train split")
    present = set(splits.tolist())
    fractions = {"test": test_fraction, "val": val_fraction}
    carved_fraction = 0.0
    for split, fraction in fractions.items():
        if split in present:
            continue
        pool = np.flatnonzero(splits == "train")
        relative = fraction / (1.0 - carved_fraction)
        splits[carve(pool, labels, groups, relative, seed, f"{where}: carving the {split} split")] = split
        carved_fraction += fraction
        log.info("%s: carved the %s split out of train (%s of the images)", where, split, fraction)
    return splits


def split_order(splits: np.ndarray) -> dict[str, np.ndarray]:
    """{split: indices} in :data:`SPLITS` order; DataError if a split is empty."""
    order = {split: np.flatnonzero(splits == split) for split in SPLITS}
    empty = [split for split, idx in order.items() if len(idx) == 0]
    if empty:
        raise DataError(f"split(s) {empty} have no images; expected images in each of {list(SPLITS)}")
    return order
