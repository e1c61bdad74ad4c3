"""scripts/verdict_stability.py: verdicts recomputed on subsets of seeds, and their agreement between runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medmerge.config import EvaluateSettings
from medmerge.predictions import SplitPredictions
from medmerge.testing import load_script


@pytest.fixture(scope="module")
def stability():
    return load_script("verdict_stability")


def logits_for(predicted: np.ndarray, num_classes: int = 3) -> np.ndarray:
    return np.eye(num_classes)[predicted]


def fake_run(seeds: list[int], accuracy: dict[str, float], n: int = 300) -> dict:
    """Per method and seed, val and test predictions right on about ``accuracy`` of the images."""
    rng = np.random.default_rng(0)
    labels = {split: rng.integers(0, 3, n) for split in ("val", "test")}
    run = {}
    for method, share in accuracy.items():
        run[method] = {}
        for seed in seeds:
            run[method][seed] = {}
            for split, truth in labels.items():
                wrong = rng.random(n) > share
                predicted = np.where(wrong, (truth + 1) % 3, truth)
                run[method][seed][split] = SplitPredictions(logits_for(predicted), truth)
    return run


def test_each_subset_gets_the_reference_on_validation_and_a_verdict_per_method(stability) -> None:
    run = fake_run([0, 1, 2, 3], {"ft_good": 0.9, "ft_bad": 0.4, "merge": 0.9})
    subsets = list(itertools.combinations([0, 1, 2, 3], 3))
    verdicts = stability.subset_verdicts(run, ["ft_good", "ft_bad"], subsets, EvaluateSettings())
    assert list(verdicts) == subsets
    for subset in subsets:
        assert verdicts[subset]["ft_good"] == "reference"
        assert verdicts[subset]["ft_bad"] == "worse"
        assert verdicts[subset]["merge"] == "no detectable difference"


def test_the_table_counts_subsets_where_every_verdict_agrees_and_names_what_flipped(stability) -> None:
    same = {"ft": "reference", "merge": "worse", "average": "worse"}
    first = {(0, 1): dict(same), (0, 2): dict(same), (1, 2): dict(same), (0, 1, 2): dict(same)}
    second = {subset: dict(v) for subset, v in first.items()}
    second[(0, 2)]["merge"] = "no detectable difference"
    second[(1, 2)]["merge"] = "no detectable difference"
    second[(1, 2)]["average"] = "better"
    table = stability.stability_table(first, second, ("native", "AVX2"))
    rows = [line for line in table.splitlines() if line.startswith("| 2 ") or line.startswith("| 3 ")]
    assert rows[0] == "| 2 | 3 | 1 | 2.0 of 3 | merge (2), average (1) |"
    assert rows[1] == "| 3 | 1 | 1 | 3.0 of 3 | none |"


def test_a_method_only_one_run_compares_is_left_out_of_the_agreement(stability) -> None:
    first = {(0, 1): {"ft": "reference", "merge": "worse", "extra": "better"}}
    second = {(0, 1): {"ft": "reference", "merge": "worse"}}
    row = stability.stability_table(first, second, ("a", "b")).splitlines()[2]
    assert row == "| 2 | 1 | 1 | 2.0 of 2 | none |"
