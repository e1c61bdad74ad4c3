"""Paired comparisons: metrics from confusion matrices, t intervals, the paired bootstrap and verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score

from medmerge.compare import (
    BETTER,
    REFERENCE,
    SAME,
    WORSE,
    PairedDifference,
    bootstrap_differences,
    choose_reference,
    family_verdicts,
    holm_adjusted,
    paired_difference,
    resample_weights,
    t_interval,
    verdict,
)
from medmerge.metrics import CONFUSION_METRICS, confusion_matrix, macro_f1


def _labels_and_predictions(seed: int, n: int = 300, k: int = 4, accuracy: float = 0.6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    predicted = np.where(rng.random(n) < accuracy, labels, rng.integers(0, k, n))
    return labels, predicted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_metrics_equal_scikit_learn(seed: int) -> None:
    labels, predicted = _labels_and_predictions(seed, k=5)
    confusion = confusion_matrix(labels, predicted, 5)
    assert CONFUSION_METRICS["f1_macro"](confusion) == pytest.approx(
        f1_score(labels, predicted, labels=range(5), average="macro", zero_division=0))
    assert macro_f1(labels, predicted, 5) == pytest.approx(CONFUSION_METRICS["f1_macro"](confusion))
    assert CONFUSION_METRICS["accuracy"](confusion) == pytest.approx(accuracy_score(labels, predicted))
    assert CONFUSION_METRICS["balanced_accuracy"](confusion) == pytest.approx(
        balanced_accuracy_score(labels, predicted))
    assert CONFUSION_METRICS["kappa_quadratic"](confusion) == pytest.approx(
        cohen_kappa_score(labels, predicted, weights="quadratic"))


def test_resampled_confusion_matrices_are_those_of_the_resampled_images() -> None:
    labels, predicted = _labels_and_predictions(3)
    weights = resample_weights(len(labels), 5, seed=1)
    assert weights.shape == (5, len(labels)) and (weights.sum(axis=1) == len(labels)).all()
    batched = confusion_matrix(labels, predicted, 4, weights)
    for row, matrix in zip(weights, batched, strict=True):
        drawn = np.repeat(np.arange(len(labels)), row.astype(int))
        np.testing.assert_array_equal(matrix, confusion_matrix(labels[drawn], predicted[drawn], 4))


def test_t_interval_is_students() -> None:
    diffs = [0.03, 0.05, 0.01, 0.04]
    low, high = t_interval(diffs, 0.95)
    half = stats.t.ppf(0.975, 3) * np.std(diffs, ddof=1) / 2
    assert (low, high) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half))
    assert all(np.isnan(t_interval([0.1], 0.95)))


def test_verdict_needs_both_intervals_on_one_side_of_zero() -> None:
    assert verdict(0.01, 0.05, 0.002, 0.04) == BETTER
    assert verdict(-0.05, -0.01, -0.04, -0.001) == WORSE
    assert verdict(0.01, 0.05, -0.001, 0.04) == SAME  # the test set cannot tell them apart
    assert verdict(-0.01, 0.05, 0.01, 0.04) == SAME  # the seeds cannot
    assert verdict(float("nan"), float("nan"), 0.01, 0.04) == SAME  # one seed: no t interval


def test_a_clearly_better_method_is_better_and_the_reference_is_the_reference() -> None:
    labels = np.random.default_rng(0).integers(0, 4, 400)
    weak = {s: _labels_and_predictions(10 + s, n=400, accuracy=0.5)[1] for s in range(3)}
    strong = {s: np.where(np.random.default_rng(20 + s).random(400) < 0.85, labels, weak[s]) for s in range(3)}
    for s in range(3):  # the weak predictions, but about right for these labels half of the time
        weak[s] = np.where(np.random.default_rng(30 + s).random(400) < 0.5, labels, weak[s])
    weights = resample_weights(400, 500, seed=0)
    better = paired_difference("strong", strong, "weak", weak, labels, 4, "f1_macro", weights, 0.95)
    assert better.verdict == BETTER and better.t_low > 0 and better.boot_low > 0 and better.seeds == 3
    per_seed = [CONFUSION_METRICS["f1_macro"](confusion_matrix(labels, strong[s], 4))
                - CONFUSION_METRICS["f1_macro"](confusion_matrix(labels, weak[s], 4)) for s in range(3)]
    assert better.diff == pytest.approx(np.mean(per_seed))
    assert better.boot_low < better.diff < better.boot_high
    worse = paired_difference("weak", weak, "strong", strong, labels, 4, "f1_macro", weights, 0.95)
    assert worse.verdict == WORSE and worse.diff == pytest.approx(-better.diff)
    same = paired_difference("weak", weak, "weak", weak, labels, 4, "f1_macro", weights, 0.95)
    assert same.verdict == REFERENCE and same.diff == 0.0


def test_holm_adjusts_step_down_and_leaves_nan_out_of_the_family() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 * 0.005, 3 * 0.01, max(2 * 0.03, ...), max(1 * 0.04, 0.06)
    assert holm_adjusted([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm_adjusted([0.02, float("nan"), 0.5])
    assert adjusted[0] == pytest.approx(0.04) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.5)


def test_a_row_better_alone_is_not_better_among_many_comparisons() -> None:
    """The same paired difference is `better` when it is the only comparison and `no detectable difference`
    among nine null comparisons: Holm's correction over the table (10 x p > 0.05)."""
    labels = np.random.default_rng(0).integers(0, 4, 400)
    reference = {s: _labels_and_predictions(40 + s, n=400, accuracy=0.6)[1] for s in range(3)}
    for s in range(3):
        reference[s] = np.where(np.random.default_rng(50 + s).random(400) < 0.6, labels, reference[s])
    slightly = {s: np.where(np.random.default_rng(60 + s).random(400) < 0.12, labels, reference[s]) for s in range(3)}
    weights = resample_weights(400, 2000, seed=0)
    alone = paired_difference("slightly", slightly, "ref", reference, labels, 4, "f1_macro", weights, 0.95)
    assert alone.verdict == BETTER and 0.005 < alone.p_value < 0.05, alone
    reference_row = paired_difference("ref", reference, "ref", reference, labels, 4, "f1_macro", weights, 0.95)
    nulls = [PairedDifference(f"null{i}", "ref", "f1_macro", 3, 0.0, -0.1, 0.1, -0.1, 0.1, SAME, p_value=0.6)
             for i in range(9)]
    assert [d.verdict for d in family_verdicts([reference_row, alone], 0.95)] == [REFERENCE, BETTER]
    corrected = family_verdicts([reference_row, alone, *nulls], 0.95)
    assert corrected[1].verdict == SAME and corrected[1].p_holm == pytest.approx(min(1.0, 10 * alone.p_value))
    assert corrected[0].verdict == REFERENCE and np.isnan(corrected[0].p_holm)


def test_identical_predictions_give_zero_bootstrap_differences() -> None:
    labels, predicted = _labels_and_predictions(5)
    weights = resample_weights(len(labels), 50, seed=2)
    assert not bootstrap_differences({0: predicted}, {0: predicted}, labels, 4, "accuracy", weights).any()


def test_the_reference_is_the_best_baseline_on_validation_and_the_first_on_a_tie() -> None:
    validation = {"ft_a": 0.70, "lpft_a": 0.72, "ft_b": 0.72, "merge": 0.90}
    assert choose_reference(validation, ["ft_a", "lpft_a", "ft_b"]) == "lpft_a"  # the merge is not a baseline
    assert choose_reference(validation, ["ft_b", "lpft_a"]) == "ft_b"


def test_the_comparison_of_a_run_from_its_saved_predictions(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compare_methods`` on the predictions.csv and cards a run leaves: methods in report order, the FT
    ensemble from its members' mean logits, per-class F1 as scikit-learn's, the reference's own verdict."""
    import json

    import yaml

    from medmerge import layout
    from medmerge.config import load_params
    from medmerge.evaluation import compare_methods
    from medmerge.predictions import SplitPredictions, write_predictions
    from medmerge.testing import REPO

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.update(seeds=[0, 1], baselines=["ft"], methods={"average": {"method": "average"}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    labels = {"val": rng.integers(0, 4, 40), "test": rng.integers(0, 3, 60)}  # no "d" in the test split
    saved = {}
    directories = [layout.source_dir("ft", source, seed) for source in params.source_names for seed in (0, 1)]
    directories += [layout.merge_dir(root, "average", seed) for root in (layout.MERGED, layout.MERGED_FT)
                    for seed in (0, 1)]
    for directory in directories:
        directory.mkdir(parents=True)
        splits = {split: SplitPredictions(rng.normal(size=(len(y), 4)).astype(np.float32), y)
                  for split, y in labels.items()}
        write_predictions(directory / layout.PREDICTIONS, splits, classes)
        (directory / "card.json").write_text(json.dumps({"compute": "cpu"}))
        saved[directory] = splits["test"].logits

    comparison = compare_methods(params)
    names = list(dict.fromkeys(comparison.per_seed["method"]))
    assert names == ["ft_imagenet", "ft_scratch", "ensemble_ft", "average_collapsed", "average"]
    assert comparison.metrics_json[comparison.reference]["verdict"] == REFERENCE
    assert comparison.reference in ("ft_imagenet", "ft_scratch")
    ensemble = np.mean([saved[layout.source_dir("ft", s, 1)] for s in params.source_names], axis=0)
    expected = f1_score(labels["test"], ensemble.argmax(axis=1), labels=range(4), average=None, zero_division=0)
    assert list(comparison.per_class["ensemble_ft"]["1"]["f1_per_class"].values()) == pytest.approx(expected)
    assert comparison.per_class["ensemble_ft"]["1"]["f1_per_class"]["d"] == 0.0  # not in the test split
    assert comparison.markdown.startswith("Target `lesions`, test split (60 images), seeds 0, 1.")
    assert comparison.layers == {} and comparison.layerwise_table.empty
