"""Paired comparisons of methods against a reference, with intervals and a verdict.

Every method is compared with the reference on the same seeds and the same test images:

- ``diff``: the mean over seeds of the per-seed difference ``metric(method, s) - metric(reference, s)``;
- ``t`` interval: Student's t over the per-seed differences (``n - 1`` degrees of freedom). Each seed
  retrains everything the pipeline trains (source pretraining, the target-side training, the merge), so
  this interval covers the training randomness. It needs at least two seeds;
- ``bootstrap`` interval: the percentile interval of the mean difference over resamples of the test
  images, one resample shared by both methods and every seed (a paired bootstrap). It covers the
  sampling of the test set, for these trained models;
- ``p_value``: the larger of the two tests' two-sided p-values (Student's t over the seeds; the bootstrap's,
  twice the smaller share of resampled differences on either side of zero): both must reject, as both
  intervals must exclude zero;
- ``p_holm``: ``p_value`` adjusted by Holm's step-down over every method compared with the reference in one
  report (:func:`holm_adjusted`), so the chance of any false ``better`` or ``worse`` in the whole table stays
  below ``1 - confidence``;
- ``verdict``: ``better`` when both intervals lie above zero and ``p_holm`` is within ``1 - confidence``,
  ``worse`` when both lie below and so is ``p_holm``, else ``no detectable difference``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from medmerge.metrics import CONFUSION_METRICS, confusion_matrix

BETTER, SAME, WORSE, REFERENCE = "better", "no detectable difference", "worse", "reference"

Predicted = Mapping[int, np.ndarray]  # seed -> predicted class of every test image


@dataclass(frozen=True)
class PairedDifference:
    method: str
    reference: str
    metric: str
    seeds: int
    diff: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    verdict: str
    p_value: float = float("nan")
    p_holm: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


def score(labels: np.ndarray, predicted: np.ndarray, num_classes: int, metric: str) -> float:
    """``metric`` (a key of ``CONFUSION_METRICS``) of the predicted classes against ``labels``."""
    return float(CONFUSION_METRICS[metric](confusion_matrix(labels, predicted, num_classes)))


def choose_reference(validation: Mapping[str, float], baselines: Sequence[str]) -> str:
    """The baseline with the best validation score (the first listed on a tie)."""
    return max(baselines, key=lambda name: validation[name])


def t_interval(differences: Sequence[float], confidence: float) -> tuple[float, float]:
    """Student's t interval of the mean of ``differences``; NaN bounds for fewer than two values."""
    values = np.asarray(differences, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    from scipy import stats

    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]``: how often each of ``n`` test images is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def bootstrap_differences(method: Predicted, reference: Predicted, labels: np.ndarray, num_classes: int,
                          metric: str, weights: np.ndarray) -> np.ndarray:
    """Per resample (rows of ``weights``): the mean over seeds of ``metric(method) - metric(reference)``."""
    score = CONFUSION_METRICS[metric]
    seeds = sorted(method)
    total = np.zeros(len(weights))
    for seed in seeds:
        for predicted, sign in ((method[seed], 1.0), (reference[seed], -1.0)):
            total += sign * score(confusion_matrix(labels, predicted, num_classes, weights))
    return total / len(seeds)


def verdict(t_low: float, t_high: float, boot_low: float, boot_high: float) -> str:
    """The verdict of one comparison on its own (before the family-wise correction)."""
    if t_low > 0 and boot_low > 0:
        return BETTER
    if t_high < 0 and boot_high < 0:
        return WORSE
    return SAME  # NaN bounds (a single seed) compare False: no verdict either way


def t_test_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of Student's t test that the mean of ``differences`` is zero (NaN below two values)."""
    values = np.asarray(differences, dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    spread = values.std(ddof=1)
    if spread == 0:
        return 1.0 if values.mean() == 0 else 0.0
    from scipy import stats

    statistic = values.mean() / (spread / np.sqrt(len(values)))
    return float(2 * stats.t.sf(abs(statistic), len(values) - 1))


def bootstrap_p(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value: twice the smaller share of resampled differences at or beyond zero."""
    share = min(float(np.mean(differences <= 0)), float(np.mean(differences >= 0)))
    return min(1.0, 2 * share)


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (in their order); NaN stays NaN and is not in the family.

    The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``: rejecting where the
    adjusted value is within alpha keeps the family-wise error rate within alpha (Holm 1979).
    """
    values = np.asarray(p_values, dtype=np.float64)
    tested = np.flatnonzero(~np.isnan(values))
    adjusted = np.full(len(values), np.nan)
    running = 0.0
    for rank, index in enumerate(tested[np.argsort(values[tested], kind="stable")]):
        running = max(running, min(1.0, (len(tested) - rank) * values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def family_verdicts(differences: Sequence[PairedDifference], confidence: float) -> list[PairedDifference]:
    """``differences`` with ``p_holm`` over all of them (the reference's own row left out) and each verdict
    kept only where ``p_holm`` is within ``1 - confidence``."""
    compared = [d.verdict != REFERENCE for d in differences]
    adjusted = holm_adjusted([d.p_value if c else float("nan") for d, c in zip(differences, compared, strict=True)])
    result = []
    for difference, p_holm in zip(differences, adjusted, strict=True):
        kept = difference.verdict if difference.verdict == REFERENCE or p_holm <= 1.0 - confidence else SAME
        result.append(replace(difference, p_holm=p_holm, verdict=kept))
    return result


def paired_difference(name: str, method: Predicted, reference_name: str, reference: Predicted,
                      labels: np.ndarray, num_classes: int, metric: str, weights: np.ndarray,
                      confidence: float) -> PairedDifference:
    """``method`` against ``reference`` on the seeds both have (the same test ``labels``)."""
    seeds = sorted(set(method) & set(reference))
    if not seeds:
        raise ValueError(f"{name} and {reference_name} share no seed")
    if name == reference_name:
        return PairedDifference(name, reference_name, metric, len(seeds), 0.0, 0.0, 0.0, 0.0, 0.0, REFERENCE)
    method, reference = {s: method[s] for s in seeds}, {s: reference[s] for s in seeds}
    per_seed = [score(labels, method[s], num_classes, metric) - score(labels, reference[s], num_classes, metric)
                for s in seeds]
    t_low, t_high = t_interval(per_seed, confidence)
    boot = bootstrap_differences(method, reference, labels, num_classes, metric, weights)
    alpha = (1.0 - confidence) / 2
    boot_low, boot_high = (float(q) for q in np.quantile(boot, [alpha, 1.0 - alpha]))
    return PairedDifference(name, reference_name, metric, len(seeds), float(np.mean(per_seed)), t_low, t_high,
                            boot_low, boot_high, verdict(t_low, t_high, boot_low, boot_high),
                            p_value=max(t_test_p(per_seed), bootstrap_p(boot)))
