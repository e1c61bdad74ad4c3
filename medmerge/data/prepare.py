"""Turn a validated raw dataset into memory-mappable, fixed-size RGB arrays.

Output directory layout (written atomically)::

    {split}_images.npy   uint8 (N, S, S, 3), C-contiguous: np.load(..., mmap_mode="r") works
    {split}_labels.npy   int64 (N,)
    meta.json            classes, num_classes, image_size, counts, source, imbalance_ratio,
                         duplicates_across_splits (see medmerge.data.validate)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from medmerge.data.npz import SPLITS, DataError, RawDataset
from medmerge.data.validate import validate_raw
from medmerge.io import atomic_directory

log = logging.getLogger("medmerge.data")

CHUNK = 1024  # images converted and resized at once
META_FILE = "meta.json"


# ---------------------------------------------------------------- channels and size


def _alpha_over_black(images: np.ndarray) -> np.ndarray:
    rgb, alpha = images[..., :3].astype(np.uint16), images[..., 3:].astype(np.uint16)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


#: channel count -> converter of a (n, H, W, C) uint8 chunk to (n, H, W, 3)
CHANNEL_CONVERTERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda images: np.repeat(images, 3, axis=-1),
    3: lambda images: images,
    4: _alpha_over_black,
}


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W) or (n, H, W, C) with C in 1/3/4 -> (n, H, W, 3); RGBA is composited on black."""
    if images.ndim == 3:
        images = images[..., None]
    channels = images.shape[-1]
    if images.ndim != 4 or channels not in CHANNEL_CONVERTERS:
        raise DataError(f"cannot make RGB from images of shape {images.shape}")
    return CHANNEL_CONVERTERS[channels](images)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (n, H, W, 3) to (n, size, size, 3): area averaging down, bilinear up; no-op if equal."""
    height, width = images.shape[1:3]
    if (height, width) == (size, size):
        return images
    shrink = size < min(height, width)
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image).resize((size, size), resample=resample))
    return out


# ---------------------------------------------------------------- classes and counts


def _check_same_order(raw: RawDataset, names: list[str]) -> None:
    """The given names may rename the file's classes, but not reorder the same names (labels would swap)."""
    if raw.class_names is not None and set(raw.class_names) == set(names) and raw.class_names != names:
        raise DataError(
            f"{raw.source}: the file's classes {raw.class_names} are the given classes {names} in another "
            "order, so labels would be swapped; pass the classes to the fetch step too (or reorder them)"
        )


def resolve_class_names(raw: RawDataset, class_names: list[str] | None = None) -> list[str]:
    """The given names, else the file's names, else ``class_{i}`` for 0..max label."""
    if class_names is not None:
        names = [str(n) for n in class_names]
        _check_same_order(raw, names)
    elif raw.class_names is not None:
        names = list(raw.class_names)
    else:
        names = [f"class_{i}" for i in range(raw.num_classes)]
    if len(set(names)) != len(names):
        raise DataError(f"{raw.source}: class names are not unique: {names}")
    top = max(int(labels.max()) for labels in raw.labels.values())
    if top >= len(names):
        raise DataError(f"{raw.source}: label {top} but only {len(names)} class names: {names}")
    return names


def class_counts(labels: dict[str, np.ndarray], class_names: list[str]) -> dict[str, dict[str, int]]:
    """{split: {class_name: n}} including classes with zero samples."""
    return {
        split: dict(zip(class_names, np.bincount(y, minlength=len(class_names)).tolist(), strict=True))
        for split, y in labels.items()
    }


def imbalance_ratio(counts: dict[str, int]) -> float | None:
    """max/min class count; None when a class has no samples."""
    low = min(counts.values())
    return None if low == 0 else max(counts.values()) / low


# ---------------------------------------------------------------- writing


def _write_split(images: np.ndarray, labels: np.ndarray, image_size: int, out: Path, split: str) -> None:
    dest = np.lib.format.open_memmap(
        out / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=(len(images), image_size, image_size, 3)
    )
    for start in range(0, len(images), CHUNK):
        dest[start : start + CHUNK] = resize_images(to_rgb(images[start : start + CHUNK]), image_size)
    dest.flush()
    del dest
    np.save(out / f"{split}_labels.npy", labels.astype(np.int64))


def prepare_dataset(
    raw: RawDataset, image_size: int, out_dir: Path, class_names: list[str] | None = None
) -> dict:
    """Write resized RGB uint8 arrays, int64 labels and ``meta.json`` to ``out_dir``; return the meta.

    Everything is written into a temporary sibling directory that replaces ``out_dir`` only when
    complete, so a failure leaves the previous ``out_dir`` (or none) and no temporary directory.
    """
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    out_dir = Path(out_dir)
    names = resolve_class_names(raw, class_names)
    counts = class_counts(raw.labels, names)
    imbalance = imbalance_ratio(counts["train"])
    report = validate_raw(raw, counts, imbalance)
    meta = {
        "classes": names,
        "num_classes": len(names),
        "image_size": int(image_size),
        "counts": counts,
        "source": raw.source.name,
        "imbalance_ratio": imbalance,
        **report,
    }
    with atomic_directory(out_dir) as tmp:
        for split in SPLITS:
            _write_split(raw.images[split], raw.labels[split], int(image_size), tmp, split)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("prepared %s -> %s (%d classes, %d px)", raw.source.name, out_dir, len(names), image_size)
    return meta


# ---------------------------------------------------------------- reading


def read_meta(prepared_dir: Path) -> dict:
    """The ``meta.json`` of a prepared dataset directory."""
    path = Path(prepared_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; run the prepare stage first")
    return json.loads(path.read_text())


def load_split(prepared_dir: Path, split: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, S, S, 3) (read-only memmap when ``mmap``) and labels int64 (N,) of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    prepared_dir = Path(prepared_dir)
    paths = [prepared_dir / f"{split}_{kind}.npy" for kind in ("images", "labels")]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: not found; run the prepare stage first")
    images = np.load(paths[0], mmap_mode="r" if mmap else None, allow_pickle=False)
    labels = np.load(paths[1], allow_pickle=False)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{paths[0]}: expected uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or labels.dtype != np.int64:
        raise DataError(f"{paths[1]}: expected int64 ({len(images)},), got {labels.dtype} {labels.shape}")
    return images, labels
