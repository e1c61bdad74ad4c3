"""Reading and writing datasets in the MedMNIST ``.npz`` layout.

A file holds ``{split}_images`` and ``{split}_labels`` for every split in :data:`SPLITS`, and
optionally ``class_names`` (a 1-D unicode array). Images are stored as (N, H, W) grayscale or
(N, H, W, C) with C in 1/3/4; labels as (N,) or MedMNIST's (N, 1).

Image dtypes accepted by :func:`load_npz` (everything is returned as uint8):

* ``uint8``: kept as is;
* ``uint16``: scaled from 0..65535 to 0..255 (``round(x * 255 / 65535)``);
* floating point: must lie in [0, 1]; scaled by 255 and rounded.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmerge.errors import InputError
from medmerge.io import atomic_file

SPLITS = ("train", "val", "test")
EXPECTED_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


class DataError(ValueError, InputError):
    """A dataset file is missing, malformed or inconsistent."""


@dataclass
class RawDataset:
    """Arrays of a validated MedMNIST-layout file: uint8 images and int64 (N,) labels per split."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: list[str] | None
    source: Path

    @property
    def num_classes(self) -> int:
        """len(class_names) when known, else 1 + the largest label."""
        if self.class_names is not None:
            return len(self.class_names)
        return 1 + max(int(labels.max()) for labels in self.labels.values())


# ---------------------------------------------------------------- image dtypes


def _from_uint16(images: np.ndarray, where: str) -> np.ndarray:
    return ((images.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _from_float(images: np.ndarray, where: str) -> np.ndarray:
    lo, hi = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise DataError(f"{where}: float images must lie in [0, 1], found values in [{lo}, {hi}]")
    return np.rint(images * 255.0).astype(np.uint8)


#: dtype kind/name -> converter to uint8 (``where`` names the file and key for error messages)
IMAGE_CONVERTERS: dict[str, Callable[[np.ndarray, str], np.ndarray]] = {
    "uint8": lambda images, where: images,
    "uint16": _from_uint16,
    "f": _from_float,
}


def to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    """Convert images to uint8 following :data:`IMAGE_CONVERTERS`; DataError for other dtypes."""
    convert = IMAGE_CONVERTERS.get(images.dtype.name) or IMAGE_CONVERTERS.get(images.dtype.kind)
    if convert is None:
        raise DataError(
            f"{where}: images have dtype {images.dtype}; expected uint8, uint16, or float in [0, 1]"
        )
    return convert(images, where)


# ---------------------------------------------------------------- validation


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3, 4))
    if not ok:
        raise DataError(
            f"{where}: images have shape {images.shape}; expected (N, H, W) or (N, H, W, C) with C in 1/3/4"
        )
    if len(images) == 0:
        raise DataError(f"{where}: split has no samples")
    return to_uint8(images, where)


def _check_labels(labels: np.ndarray, n_images: int, num_classes: int | None, where: str) -> np.ndarray:
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels have dtype {labels.dtype}; expected integer class indices")
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{where}: labels have shape {labels.shape}: multi-label data is not supported "
            "(expected one class index per image, shape (N,) or (N, 1))"
        )
    if labels.ndim not in (1, 2):
        raise DataError(f"{where}: labels have shape {labels.shape}; expected (N,) or (N, 1)")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != n_images:
        raise DataError(f"{where}: {len(labels)} labels for {n_images} images; expected one label per image")
    if labels.min() < 0:
        raise DataError(f"{where}: negative label {int(labels.min())}; labels must be 0..num_classes-1")
    if num_classes is not None and labels.max() >= num_classes:
        bad = int(labels.max())
        raise DataError(
            f"{where}: label {bad} is outside 0..{num_classes - 1} (the dataset has {num_classes} classes)"
        )
    return labels


def _read(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """One array of the file; object arrays (which need pickle) and corrupt members raise DataError."""
    try:
        return npz[key]
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise DataError(
            f"{path} [{key}]: cannot be read ({err}); object arrays are refused because they need pickle"
        ) from err


def _class_names(npz: np.lib.npyio.NpzFile, path: Path) -> list[str] | None:
    if "class_names" not in npz.files:
        return None
    names = _read(npz, "class_names", path)
    if names.dtype.kind != "U" or names.ndim != 1 or len(names) == 0:
        raise DataError(
            f"{path} [class_names]: expected a non-empty 1-D unicode array, got {names.dtype} {names.shape}"
        )
    return [str(n) for n in names]


def _resolve_num_classes(class_names: list[str] | None, num_classes: int | None, path: Path) -> int | None:
    if num_classes is not None and class_names is not None and num_classes != len(class_names):
        raise DataError(f"{path}: num_classes={num_classes} but the file names {len(class_names)} classes")
    return num_classes if num_classes is not None else (len(class_names) if class_names else None)


def load_npz(path: str | Path, num_classes: int | None = None) -> RawDataset:
    """Load and validate a MedMNIST-layout ``.npz`` file (no pickle); errors name the file and key."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    with npz:
        missing = [key for key in EXPECTED_KEYS if key not in npz.files]
        if missing:
            raise DataError(
                f"{path}: missing key(s) {missing}; expected keys {list(EXPECTED_KEYS)} "
                f"(+ optional 'class_names'), found {sorted(npz.files)}"
            )
        class_names = _class_names(npz, path)
        classes = _resolve_num_classes(class_names, num_classes, path)
        images, labels = {}, {}
        for split in SPLITS:
            images[split] = _check_images(_read(npz, f"{split}_images", path), f"{path} [{split}_images]")
            labels[split] = _check_labels(
                _read(npz, f"{split}_labels", path), len(images[split]), classes, f"{path} [{split}_labels]"
            )
    return RawDataset(images, labels, class_names, path)


# ---------------------------------------------------------------- writing


def save_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray], compress: bool = False) -> None:
    """Write ``arrays`` to ``path`` as .npz via a temporary file in the same directory + ``os.replace``."""
    path = Path(path)
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    for key, value in arrays.items():
        if value.dtype.hasobject:
            raise DataError(
                f"{path} [{key}]: object arrays cannot be saved without pickle; use a unicode array"
            )
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)
