"""scripts/compare_runs.py on two run directories laid out as `dvc repro` leaves them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from medmerge.testing import load_script

COLUMNS = ["method", "kind", "seeds", "f1_macro_mean", "f1_macro_std", "diff", "t_low", "t_high", "boot_low",
           "boot_high", "verdict"]


@pytest.fixture(scope="module")
def compare_runs():
    return load_script("compare_runs")


def make_run(root: Path, data_md5: str, verdicts: dict[str, str], diff: float = -0.05) -> Path:
    lock = {"schema": "2.0", "stages": {
        "fetch_data@lesions": {"cmd": "x", "outs": [{"path": "data/raw/lesions", "md5": data_md5}]},
        "pretrain@imagenet-0": {"cmd": "x", "outs": [{"path": "models/pretrained/seed_0/imagenet", "md5": root.name}]},
    }}
    (root / "reports").mkdir(parents=True)
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    with (root / "reports" / "comparison.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerow({"method": "lpft_imagenet", "kind": "LP-FT", "seeds": 3, "f1_macro_mean": 0.7,
                         "f1_macro_std": 0.01, "diff": 0.0, "t_low": 0.0, "t_high": 0.0, "boot_low": 0.0,
                         "boot_high": 0.0, "verdict": "reference"})
        for method, verdict in verdicts.items():
            writer.writerow({"method": method, "kind": "merge", "seeds": 3, "f1_macro_mean": 0.65,
                             "f1_macro_std": 0.02, "diff": diff, "t_low": diff - 0.05, "t_high": diff + 0.06, "boot_low": -0.07,
                             "boot_high": -0.02, "verdict": verdict})
    return root


def test_counts_agreeing_verdicts_and_compares_only_cpu_independent_hashes(compare_runs, tmp_path: Path) -> None:
    first = make_run(tmp_path / "a", "same", {"medmerge": "worse", "average": "worse"})
    second = make_run(tmp_path / "b", "same", {"medmerge": "no detectable difference", "average": "worse"})
    text, agree, total = compare_runs.compare(first, second, ("native", "AVX2"))
    assert (agree, total) == (2, 3)  # the reference, average; not medmerge
    assert "| `data/raw/lesions` | `same` | `same` | equal |" in text
    assert "| `models/pretrained" not in text  # listed one by one: only data and sources, which every CPU must match
    assert ("Every output in `dvc.lock` (trained models and reports included): 1 of 2 equal; different: "
            "`models/pretrained/seed_0/imagenet`.") in text
    assert "| medmerge |" in text and text.count("**no**") == 1
    assert "Verdicts agree for 2 of 3 methods; each run's Δ lies inside the other's t interval for 2 of 2." in text


def test_a_mean_outside_the_other_runs_interval_is_flagged(compare_runs, tmp_path: Path) -> None:
    first = make_run(tmp_path / "a", "same", {"medmerge": "worse"}, diff=-0.05)
    second = make_run(tmp_path / "b", "same", {"medmerge": "worse"}, diff=-0.12)  # its interval: [-0.17, -0.06]
    text, agree, _ = compare_runs.compare(first, second, ("a", "b"))
    assert agree == 2 and "| **no** | yes |" in text
    assert "inside the other's t interval for 0 of 1." in text


def test_different_data_hashes_and_methods_in_one_run_only_are_shown(compare_runs, tmp_path: Path) -> None:
    first = make_run(tmp_path / "a", "x1", {"medmerge": "worse", "extra": "better"})
    second = make_run(tmp_path / "b", "x2", {"medmerge": "worse"})
    text, agree, total = compare_runs.compare(first, second, ("a", "b"))
    assert "**different**" in text and (agree, total) == (2, 2)
    assert "In one run only: extra." in text


def test_a_run_without_a_report_stops_with_its_path(compare_runs, tmp_path: Path) -> None:
    first = make_run(tmp_path / "a", "x", {})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    with pytest.raises(SystemExit, match="comparison.csv: not found"):
        compare_runs.compare(first, tmp_path / "empty", ("a", "b"))
