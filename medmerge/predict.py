"""Prediction with an exported model dir: the training preprocessing, class probabilities, a results table.

The preprocessing is the pipeline's own, read from the model's card (``input``: image size, resize policy,
mean/std): files are read and resized by :func:`medmerge.data.load_and_resize` (the readers and the resize
policy of data preparation), batches are normalised by :class:`~medmerge.data.loader.DeviceTransform` and scored by
:func:`medmerge.train.predict`, exactly as the evaluate stage scores the prepared test split.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from medmerge.data import DataError, load_and_resize, resize_images, to_rgb
from medmerge.data.images import is_image_file
from medmerge.data.loader import ArrayBatches, DeviceTransform
from medmerge.device import Runtime, resolve_runtime
from medmerge.models import CheckpointError, create_model, load_model_dir
from medmerge.train import predict

__all__ = ["Classifier", "input_files", "load_classifier", "predict_files", "predictions_table"]

PREDICTED_COLUMN = "predicted"
PROBABILITY_PREFIX = "prob_"
CSV_PATH_COLUMN = "path"


@dataclass
class Classifier:
    """A loaded model dir: the timm model in eval mode, its card, and where it runs."""

    model: nn.Module
    card: dict[str, Any]
    runtime: Runtime

    @property
    def classes(self) -> list[str]:
        return list(self.card.get("classes") or [f"class_{i}" for i in range(self.card["num_classes"])])

    @property
    def image_size(self) -> int:
        return int(self.card["input"]["input_size"][-1])

    @property
    def resize(self) -> str:
        return self.card["input"].get("resize", "squash")

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W[, C]) images, C in 1/3/4 -> uint8 (N, S, S, 3) resized as data preparation does."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (0..255), got {images.dtype}")
        return resize_images(to_rgb(images), self.image_size, self.resize)

    def probabilities(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, K) of uint8 (N, S, S, 3) images prepared by :meth:`prepare`."""
        preprocessing = self.card["input"]
        transform = DeviceTransform(preprocessing["mean"], preprocessing["std"], self.runtime)
        batches = ArrayBatches(images, np.zeros(len(images), dtype=np.int64), batch_size=batch_size)
        return predict(self.model, batches, transform)[0]


def load_classifier(model_dir: str | os.PathLike[str], device: str = "cpu") -> Classifier:
    """The model in ``model_dir`` (sha256-checked, loaded strictly) on ``device`` (``cpu``, ``cuda``, ``auto``),
    in full precision. A dir without a recorded preprocessing (a fetched source) is refused."""
    state, card = load_model_dir(model_dir)
    if "input" not in card:
        raise CheckpointError(f"{Path(model_dir) / 'card.json'}: no 'input' preprocessing recorded; only models "
                              "trained by the pipeline (pretrained, baselines, merged) can predict")
    model = create_model(card["arch"], num_classes=card["num_classes"])
    model.load_state_dict(state, strict=True)
    runtime = resolve_runtime(device, "none", "off")
    return Classifier(runtime.prepare(model).eval(), card, runtime)


def predictions_table(probabilities: np.ndarray, classes: Sequence[str], index: Iterable | None = None) -> pd.DataFrame:
    """One row per image: the predicted class name, then one ``prob_<class>`` column per class."""
    table = pd.DataFrame(probabilities.astype(np.float64), columns=[f"{PROBABILITY_PREFIX}{c}" for c in classes],
                         index=None if index is None else list(index))
    table.insert(0, PREDICTED_COLUMN, np.asarray(classes, dtype=object)[probabilities.argmax(axis=1)])
    return table


def _csv_files(path: Path, column: str) -> list[Path]:
    table = pd.read_csv(path)
    if column not in table.columns:
        raise DataError(f"{path}: no column {column!r} of image paths; columns are {list(table.columns)}")
    return [file if file.is_absolute() else path.parent / file for file in map(Path, table[column].astype(str))]


def input_files(sources: Sequence[str | os.PathLike[str]], path_column: str = CSV_PATH_COLUMN) -> list[Path]:
    """The image files named by ``sources``: a folder (its image files, recursively, sorted), a CSV (its
    ``path_column``, relative to the CSV's folder), or image files (PNG, JPEG, BMP, TIFF, DICOM)."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if is_image_file(p))
            if not found:
                raise DataError(f"{source}: folder holds no image files")
            files.extend(found)
        elif source.suffix.lower() == ".csv":
            files.extend(_csv_files(source, path_column))
        else:
            files.append(source)
    return files


def predict_files(classifier: Classifier, files: Sequence[Path], batch_size: int = 64,
                  progress: bool = True) -> pd.DataFrame:
    """:func:`predictions_table` of ``files`` (index: the paths), read and scored ``batch_size`` at a time."""
    chunks = []
    quiet = {} if progress else {"disable": True}  # not disable=False: TQDM_DISABLE still applies
    with tqdm(total=len(files), desc="predict", unit="image", dynamic_ncols=True, **quiet) as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            images = np.stack([load_and_resize(path, classifier.image_size, classifier.resize) for path in chunk])
            chunks.append(classifier.probabilities(images, batch_size))
            bar.update(len(chunk))
    probabilities = np.concatenate(chunks) if chunks else np.zeros((0, len(classifier.classes)))
    table = predictions_table(probabilities, classifier.classes, index=[str(p) for p in files])
    table.index.name = CSV_PATH_COLUMN
    return table
