"""What a model predicted: its logits on the validation and test splits, one CSV beside its weights.

Every stage that produces an evaluated model writes them once; ``evaluate`` reads them instead of running
every model again, and the paired comparisons resample them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("val", "test")


@dataclass(frozen=True)
class SplitPredictions:
    """One split's logits (N, K) and labels (N,), in the prepared split's order."""

    logits: np.ndarray
    labels: np.ndarray

    @property
    def probabilities(self) -> np.ndarray:
        shifted = self.logits - self.logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


def write_predictions(path: str | Path, splits: Mapping[str, SplitPredictions], classes: Sequence[str]) -> None:
    """A CSV with columns ``split, index, label, logit.<class>...`` (float32 logits to 9 digits)."""
    import pandas as pd

    frames = []
    for split, predictions in splits.items():
        frame = pd.DataFrame(predictions.logits.astype(np.float32), columns=[f"logit.{c}" for c in classes])
        frame.insert(0, "label", predictions.labels.astype(np.int64))
        frame.insert(0, "index", np.arange(len(frame)))
        frame.insert(0, "split", split)
        frames.append(frame)
    pd.concat(frames, ignore_index=True).to_csv(path, index=False, float_format="%.9g")


def read_predictions(path: str | Path) -> dict[str, SplitPredictions]:
    """``{split: SplitPredictions}`` from :func:`write_predictions`'s CSV."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions not found (did the stage that writes this model run?)")
    frame = pd.read_csv(path)
    logit_columns = [c for c in frame.columns if c.startswith("logit.")]
    return {split: SplitPredictions(group[logit_columns].to_numpy(np.float64), group["label"].to_numpy(np.int64))
            for split, group in frame.groupby("split", sort=False)}


def class_names(path: str | Path) -> list[str]:
    """The class names in a predictions CSV's header, in label order."""
    header = Path(path).read_text().split("\n", 1)[0].split(",")
    return [c[len("logit."):] for c in header if c.startswith("logit.")]
