"""The raw form of an image-file dataset: ``<name>.splits.csv`` (one row per image) + ``<name>.classes.json``.

The ``imagefolder`` and ``csv`` origins write these two small files into ``data/raw/<name>/`` instead of
a copy of the pixels; the prepare stage reads the images from the ``file`` column, where they are.

``<name>.splits.csv`` columns: ``path`` (as the source names the image), ``label`` (class name),
``split``, ``group`` (patient; the path when there is none), ``file`` (the file that is read).
``<name>.classes.json``: ``{"classes": [...], "source": "<folder or CSV>"}`` (the class order).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medmerge.data.npz import SPLITS, DataError
from medmerge.io import atomic_file

MANIFEST_COLUMNS = ("path", "label", "split", "group", "file")


def manifest_path(npz_path: Path) -> Path:
    """``<dir>/<name>.splits.csv`` next to ``<dir>/<name>.npz``."""
    return Path(npz_path).with_name(f"{Path(npz_path).stem}.splits.csv")


def classes_path(npz_path: Path) -> Path:
    """``<dir>/<name>.classes.json`` next to ``<dir>/<name>.npz``."""
    return Path(npz_path).with_name(f"{Path(npz_path).stem}.classes.json")


def write_manifest(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    """Write rows of :data:`MANIFEST_COLUMNS` as CSV via a temporary sibling + ``os.replace``."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    return path


def write_image_manifest(npz_path: Path, rows: Sequence[Sequence[str]], classes: list[str], source: str) -> Path:
    """Write the manifest and the class list for the dataset whose npz would be ``npz_path``."""
    manifest = write_manifest(manifest_path(npz_path), rows)
    try:
        with atomic_file(classes_path(npz_path)) as tmp:
            tmp.write_text(json.dumps({"classes": classes, "source": source}, indent=2) + "\n")
    except BaseException:
        manifest.unlink(missing_ok=True)  # no manifest without its class list
        raise
    return manifest


@dataclass
class ImageManifest:
    """An image-file dataset to prepare: per split the files (``images``), labels and groups."""

    images: dict[str, list[Path]]
    labels: dict[str, np.ndarray]
    groups: dict[str, np.ndarray]
    class_names: list[str]
    source: Path
    meta: dict = field(default_factory=dict)


def read_image_manifest(npz_path: Path) -> ImageManifest:
    """The manifest and class list written by :func:`write_image_manifest`; errors name the file."""
    path, info_path = manifest_path(npz_path), classes_path(npz_path)
    for file in (path, info_path):
        if not file.is_file():
            raise DataError(f"{file}: not found; run the fetch_data stage first")
    info = json.loads(info_path.read_text())
    classes = [str(c) for c in info["classes"]]
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(MANIFEST_COLUMNS)}")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(table["label"]) - set(index))
    if unknown:
        raise DataError(f"{path}: label(s) {unknown} are not in {info_path.name} classes {classes}")
    images, labels, groups = {}, {}, {}
    for split in SPLITS:
        rows = table[table["split"] == split]
        if rows.empty:
            raise DataError(f"{path}: the {split} split has no images")
        images[split] = [Path(f) for f in rows["file"]]
        labels[split] = rows["label"].map(index).to_numpy(dtype=np.int64)
        groups[split] = rows["group"].to_numpy()
    return ImageManifest(images, labels, groups, classes, path, {"source": info.get("source")})
