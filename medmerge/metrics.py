"""Classification metrics from labels and predicted probabilities (scikit-learn does the arithmetic)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Macro F1 over all ``num_classes`` classes (a class never predicted nor present scores 0)."""
    return float(f1_score(labels, predictions, labels=list(range(num_classes)), average="macro", zero_division=0))


def macro_auroc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """One-vs-rest macro AUROC over the classes present in ``labels``; NaN when fewer than two are."""
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    scores = [roc_auc_score(labels == k, probabilities[:, k]) for k in present]
    return float(np.mean(scores))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """Macro F1 (the primary metric), accuracy, balanced accuracy, macro AUROC and per-class F1."""
    num_classes = len(class_names)
    predictions = probabilities.argmax(axis=1)
    per_class = f1_score(labels, predictions, labels=list(range(num_classes)), average=None, zero_division=0)
    return {
        "f1_macro": macro_f1(labels, predictions, num_classes),
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "auroc_macro": macro_auroc(labels, probabilities),
        "f1_per_class": {name: float(score) for name, score in zip(class_names, per_class, strict=True)},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=list(range(num_classes))).tolist(),
    }
