"""scripts/learning_curve.py on `dvc exp show --json` output of the shape DVC 3 writes."""

from __future__ import annotations

import pytest

from medmerge.testing import load_script


@pytest.fixture(scope="module")
def learning_curve():
    return load_script("learning_curve")


def run(name: str, timestamp: str, fraction: float | None, f1: float, error: dict | None = None) -> dict:
    lesions = {"origin": "synthetic"} if fraction is None else {"origin": "synthetic", "train_fraction": fraction}
    metrics = {"lpft_imagenet": {"f1_macro": 0.7, "verdict": "reference"},
               "medmerge": {"f1_macro": f1, "f1_macro_boot_low": -0.05, "f1_macro_boot_high": 0.01}}
    return {"rev": name, "name": name, "error": error, "experiments": None, "data": {
        "rev": name, "timestamp": timestamp,
        "params": {"params.yaml": {"data": {"data": {"target": "lesions", "datasets": {"lesions": lesions}}}}},
        "metrics": {"reports/metrics.json": {"data": metrics}}}}


def shown(*experiments: tuple[dict, str]) -> list:
    return [run("workspace", "", None, 0.9),
            {**run("abc123", "2026-12-01T10:00:00", None, 0.8), "name": "main",
             "experiments": [{"name": r["name"], "revs": [r],
                              "executor": {"state": executor, "name": "dvc-task", "local": {}}} for r, executor in experiments]}]


def test_one_column_per_fraction_from_finished_experiments(learning_curve) -> None:
    table = learning_curve.table(shown(
        (run("frac-0.25", "2026-12-01T11:00:00", 0.25, 0.50), "success"),
        (run("frac-0.25-old", "2026-12-01T10:30:00", 0.25, 0.10), None),  # older run of the same fraction
        (run("frac-0.5", "2026-12-01T11:10:00", 0.5, 0.60), None),
        (run("frac-1.0", "2026-12-01T11:20:00", None, 0.65), None),
        (run("failed", "2026-12-01T11:30:00", 0.75, 0.99, error={"msg": "Experiment run failed"}), "failed"),
        (run("running", "2026-12-01T11:40:00", 0.125, 0.99), "running"),
        (run("queued", "2026-12-01T11:50:00", 0.0625, 0.99), "queued"),
    ), "f1_macro").splitlines()
    assert table[0] == "| method | 0.25 (frac-0.25) | 0.5 (frac-0.5) | 1 (frac-1.0) |"
    assert table[2] == "| lpft_imagenet | 0.700 (reference) | 0.700 (reference) | 0.700 (reference) |"
    assert table[3] == ("| medmerge | 0.500 (Δ boot [-0.050, +0.010]) | 0.600 (Δ boot [-0.050, +0.010]) "
                        "| 0.650 (Δ boot [-0.050, +0.010]) |")


def test_without_finished_experiments_the_commits_are_shown(learning_curve) -> None:
    table = learning_curve.table(shown((run("running", "t", 0.5, 0.99), "running")), "f1_macro")
    assert "0.99" not in table and "0.800" in table
