"""Classification metrics from labels and predicted probabilities.

Macro and per-class F1, the primary metric, are computed here from confusion counts (NumPy only, so the
training loop needs no scikit-learn import, and vectorised over resamples for the paired bootstrap); they
equal scikit-learn's ``f1_score(average="macro" or None, zero_division=0)`` over all classes. Accuracy and
balanced accuracy also have confusion-matrix forms (:data:`CONFUSION_METRICS`, for the reports); AUROC and
:func:`classification_metrics`' accuracies are scikit-learn's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def f1_from_counts(true_positives: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per-class F1 from per-class counts (``[..., K]`` arrays): ``2 TP / (predicted + actual)``, 0 for a class
    never predicted nor present; macro F1 is its mean over the classes."""
    denominator = predicted + actual
    return np.divide(2.0 * true_positives, denominator, out=np.zeros(np.shape(denominator)), where=denominator > 0)


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Macro F1 over all ``num_classes`` classes (a class never predicted nor present scores 0)."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    hits = np.bincount(labels[labels == predictions], minlength=num_classes)
    return float(f1_from_counts(hits, np.bincount(predictions, minlength=num_classes),
                                np.bincount(labels, minlength=num_classes)).mean(axis=-1))


def macro_auroc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """One-vs-rest macro AUROC over the classes present in ``labels``; NaN when fewer than two are."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    scores = [roc_auc_score(labels == k, probabilities[:, k]) for k in present]
    return float(np.mean(scores))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """Macro F1 (the primary metric), accuracy, balanced accuracy, macro AUROC, per-class F1 and the
    confusion matrix."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    num_classes = len(class_names)
    predictions = probabilities.argmax(axis=1)
    confusion = confusion_matrix(labels, predictions, num_classes)
    return {
        "f1_macro": macro_f1(labels, predictions, num_classes),
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "auroc_macro": macro_auroc(labels, probabilities),
        "f1_per_class": {name: float(score) for name, score in zip(class_names, f1_per_class(confusion), strict=True)},
        "confusion_matrix": confusion.tolist(),
    }


# ---------------------------------------------------------------- metrics of confusion matrices
# Each maps confusion matrices ``[..., K, K]`` (rows: true class, columns: predicted) to values ``[...]``,
# so that one function serves a single evaluation and every resample of a bootstrap at once.


def f1_per_class(confusion: np.ndarray) -> np.ndarray:
    """``[..., K]``: the F1 of each class (0 for a class never predicted nor present)."""
    return f1_from_counts(np.diagonal(confusion, axis1=-2, axis2=-1), confusion.sum(axis=-2), confusion.sum(axis=-1))


def _f1_macro(confusion: np.ndarray) -> np.ndarray:
    return f1_per_class(confusion).mean(axis=-1)


def _accuracy(confusion: np.ndarray) -> np.ndarray:
    return np.trace(confusion, axis1=-2, axis2=-1) / confusion.sum(axis=(-2, -1))


def _balanced_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present (scikit-learn's definition)."""
    actual = confusion.sum(axis=-1)
    recall = np.divide(np.diagonal(confusion, axis1=-2, axis2=-1), actual, out=np.zeros(actual.shape),
                       where=actual > 0)
    return recall.sum(axis=-1) / np.maximum((actual > 0).sum(axis=-1), 1)


def _kappa_quadratic(confusion: np.ndarray) -> np.ndarray:
    """Cohen's kappa with quadratic weights (the standard metric of diabetic-retinopathy grading)."""
    k = confusion.shape[-1]
    grades = np.arange(k)
    weights = (grades[:, None] - grades[None, :]) ** 2 / max(k - 1, 1) ** 2
    total = confusion.sum(axis=(-2, -1), keepdims=True)
    expected = confusion.sum(axis=-1)[..., :, None] * confusion.sum(axis=-2)[..., None, :] / total
    observed_cost = (weights * confusion).sum(axis=(-2, -1))
    expected_cost = (weights * expected).sum(axis=(-2, -1))
    return 1.0 - np.divide(observed_cost, expected_cost, out=np.zeros(np.shape(observed_cost)),
                           where=expected_cost > 0)


CONFUSION_METRICS = {
    "f1_macro": _f1_macro,
    "accuracy": _accuracy,
    "balanced_accuracy": _balanced_accuracy,
    "kappa_quadratic": _kappa_quadratic,
}


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """``[K, K]`` counts, or with ``weights`` of shape ``[B, N]`` (how often each sample is drawn in each of B
    resamples) the ``[B, K, K]`` confusion matrices of all resamples."""
    pair = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    if weights is None:
        return np.bincount(pair, minlength=num_classes**2).reshape(num_classes, num_classes)
    onehot = np.zeros((len(pair), num_classes**2))
    onehot[np.arange(len(pair)), pair] = 1.0
    return (weights @ onehot).reshape(len(weights), num_classes, num_classes)


#: the scalar test metrics every dataset reports, in report order
REPORTED_METRICS = ("f1_macro", "accuracy", "balanced_accuracy", "auroc_macro")
#: what an ordinal task (``data.datasets.<name>.ordinal: true``, e.g. retinopathy grades 0-4) reports as well
ORDINAL_METRICS = ("kappa_quadratic",)


def reported_metrics(ordinal: bool = False) -> tuple[str, ...]:
    """The names of the scalar metrics a dataset reports (each one that :func:`scalar_metrics` computes):
    :data:`REPORTED_METRICS`, then :data:`ORDINAL_METRICS` for an ordinal task."""
    return (*REPORTED_METRICS, *(ORDINAL_METRICS if ordinal else ()))


def scalar_metrics(labels: np.ndarray, probabilities: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Each metric of ``names``: a key of ``CONFUSION_METRICS`` or ``auroc_macro``."""
    num_classes = probabilities.shape[1]
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1), num_classes)
    return {name: macro_auroc(labels, probabilities) if name == "auroc_macro"
            else float(CONFUSION_METRICS[name](confusion)) for name in names}
