"""Checks of a raw dataset before preparation, reported as log warnings (logger ``medmerge.data``).

* the same image (identical prepared uint8 pixels) in two splits: leakage between train and evaluation;
* a split without any image of a class (an error for the train split unless the dataset allows it);
* class imbalance of the train split (max / min class count).
"""

from __future__ import annotations

import hashlib
import logging
from itertools import combinations

import numpy as np

from medmerge.data.npz import DataError

log = logging.getLogger("medmerge.data")

#: train imbalance (max / min class count) from which a warning is logged instead of an info line
IMBALANCE_WARN_RATIO = 10.0


def image_digest(image: np.ndarray) -> bytes:
    """Content hash (shape + pixels) of one image."""
    digest = hashlib.blake2b(str(image.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.digest()


def image_hashes(images: np.ndarray) -> set[bytes]:
    """Content hashes of every image in an (N, ...) array."""
    return {image_digest(image) for image in images}


def duplicates_across_splits(images: dict[str, np.ndarray]) -> tuple[int, dict[tuple[str, str], int]]:
    """(distinct images found in more than one split, {(split_a, split_b): images shared by the pair})."""
    return shared_hashes({split: image_hashes(array) for split, array in images.items()})


def shared_hashes(hashes: dict[str, set[bytes]]) -> tuple[int, dict[tuple[str, str], int]]:
    """:func:`duplicates_across_splits` from the image hashes of each split."""
    pairs = {(a, b): len(hashes[a] & hashes[b]) for a, b in combinations(hashes, 2)}
    seen: dict[bytes, int] = {}
    for split_hashes in hashes.values():
        for digest in split_hashes:
            seen[digest] = seen.get(digest, 0) + 1
    return sum(1 for n in seen.values() if n > 1), {pair: n for pair, n in pairs.items() if n}


def warn_duplicates(hashes: dict[str, set[bytes]], source: str) -> int:
    """Log one warning per pair of splits sharing images; return the number of shared images."""
    total, pairs = shared_hashes(hashes)
    for (a, b), n in pairs.items():
        log.warning(
            "%s: %d image(s) appear in both the %r and %r splits (identical pixels): evaluation leaks training data",
            source, n, a, b,
        )  # fmt: skip
    return total


def check_missing_classes(counts: dict[str, dict[str, int]], source: str, allow_missing: bool) -> None:
    """DataError when the train split lacks a class (unless ``allow_missing``); warnings for the others."""
    for split, per_class in counts.items():
        missing = [name for name, n in per_class.items() if n == 0]
        if not missing:
            continue
        if split == "train" and not allow_missing:
            raise DataError(
                f"{source}: the train split has no image of class(es) {missing}, so the model could never "
                "predict them; fix the data or classes, or set allow_missing_classes: true for this dataset"
            )
        log.warning("%s: split %r has no samples of class(es) %s", source, split, missing)


def log_imbalance(train_counts: dict[str, int], ratio: float | None, source: str) -> None:
    """Info line with the train class counts; a warning from :data:`IMBALANCE_WARN_RATIO` on."""
    if ratio is None:
        return  # a class without samples: already warned by warn_missing_classes
    level = logging.WARNING if ratio >= IMBALANCE_WARN_RATIO else logging.INFO
    log.log(level, "%s: train class imbalance %.2f (max/min count) %s", source, ratio, train_counts)
