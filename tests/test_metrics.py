"""Metrics: macro F1, AUROC, quadratic kappa, the reported set per task."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medmerge.metrics import (
    CONFUSION_METRICS,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    reported_metrics,
    scalar_metrics,
)


def test_metrics_on_known_labels() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 0])
    probabilities = np.eye(3)[predictions] * 0.7 + 0.1
    metrics = classification_metrics(labels, probabilities, ["a", "b", "c"])
    # by hand: class a P=1/2 R=1/2 F1=1/2; b P=2/3 R=1 F1=4/5; c P=1 R=1/2 F1=2/3
    assert metrics["f1_per_class"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 2 / 3})
    assert metrics["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert 0.5 < metrics["auroc_macro"] <= 1.0


def test_macro_f1_counts_absent_classes_and_auroc_needs_two_classes() -> None:
    assert macro_f1(np.array([0, 0]), np.array([0, 0]), num_classes=2) == pytest.approx(0.5)
    one_class = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.4, 0.6]]), ["x", "y"])
    assert math.isnan(one_class["auroc_macro"])


def quadratic_kappa(labels: np.ndarray, predictions: np.ndarray, num_classes: int = 3) -> float:
    return float(CONFUSION_METRICS["kappa_quadratic"](confusion_matrix(labels, predictions, num_classes)))


def test_quadratic_kappa_on_a_hand_computed_example() -> None:
    labels, predictions = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])
    # by hand: observed O = [[1,0,0],[0,0,1],[0,1,1]]; expected E = outer([1,1,2], [1,1,2]) / 4;
    # weights (i-j)^2: sum(w*O) = 2, sum(w*E) = (9 + 3 + 10) / 4 = 5.5; kappa = 1 - 2 / 5.5 = 7/11
    assert quadratic_kappa(labels, predictions) == pytest.approx(7 / 11)
    assert quadratic_kappa(labels, labels) == pytest.approx(1.0)
    one_off, two_off = np.array([0, 1, 2, 1]), np.array([0, 1, 2, 0])  # same accuracy, a miss by one vs two grades
    assert quadratic_kappa(labels, one_off) > quadratic_kappa(labels, two_off)
    assert quadratic_kappa(np.array([0, 0, 2, 2]), np.array([2, 2, 0, 0])) == pytest.approx(-1.0)  # all reversed


def test_ordinal_tasks_also_report_quadratic_kappa() -> None:
    assert reported_metrics() == ("f1_macro", "accuracy", "balanced_accuracy", "auroc_macro")
    assert reported_metrics(ordinal=True) == (*reported_metrics(), "kappa_quadratic")
    labels = np.array([0, 1, 2, 2])
    probabilities = np.eye(3)[[0, 2, 2, 1]] * 0.7 + 0.1
    metrics = scalar_metrics(labels, probabilities, reported_metrics(ordinal=True))
    assert list(metrics) == list(reported_metrics(ordinal=True))
    assert metrics["kappa_quadratic"] == pytest.approx(7 / 11)
    plain = classification_metrics(labels, probabilities, ["g0", "g1", "g2"])
    assert all(metrics[name] == pytest.approx(plain[name]) for name in reported_metrics())
