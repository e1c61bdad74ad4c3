"""The benchmarks run at a tiny size, so that they cannot break unnoticed (their numbers are not checked)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import method_cost
from medmerge.config import ConfigError

TINY = ["data.image_size=32", *(f"data.datasets.lesions.options.{key}={value}" for key, value in
                                 {"n_train": 24, "n_val": 12, "n_test": 12, "image_size": 32}.items()),
        "finetune.batch_size=12", "merge.batch_size=12", "merge.epochs=1", "methods.distill.options.distill_epochs=1",
        "device.cpu_threads=1"]  # two threads on busy cores wait for each other in every parallel region


def cost_args(methods: list[str], params: list[str]) -> argparse.Namespace:
    return argparse.Namespace(repo=None, arch="test_resnet", methods=methods, device="cpu", params=params)


def test_method_cost_reads_the_entries_through_the_validated_params() -> None:
    raw, params = method_cost.bench_params(cost_args(["average", "distill"], TINY))
    assert list(params.methods) == ["average", "distill"] and params.arch == "test_resnet"
    assert params.method("distill").options == {"distill_epochs": 1} and params.data.image_size == 32
    with pytest.raises(SystemExit, match="not entries of"):
        method_cost.bench_params(cost_args(["averag"], []))
    with pytest.raises(ConfigError, match="methods.distill.options.distill_epochs"):
        method_cost.bench_params(cost_args(["distill"], ["methods.distill.options.distill_epochs=-1"]))


def test_method_cost_table_divides_by_the_fine_tune_epoch() -> None:
    medians = {method_cost.FINETUNE: {"seconds": 2.0, "peak_bytes": 100 * 2**20},
               "average": {"seconds": 1.0, "peak_bytes": 300 * 2**20}}
    rows = method_cost.table(medians).splitlines()[2:]
    assert rows == ["| **one fine-tune epoch** (reference) | 2.00 | 1.00 | 100 | 1.00 |",
                    "| `average` | 1.00 | 0.50 | 300 | 3.00 |"]


@pytest.mark.slow  # two data stages and three fresh processes that import torch: ~20 s on 2 busy cores
def test_method_cost_prints_one_row_per_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    methods = ["medmerge_aligned", "distill"]  # aligned and learned; trained from the FT teachers
    method_cost.main(["--arch", "test_resnet", "--methods", *methods, "--json", str(tmp_path / "cost.json"),
                      "--params", *TINY])
    lines = capsys.readouterr().out.splitlines()
    assert any("test_resnet, 32 px, 24 target training images" in line for line in lines)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")][1:]
    assert [row[0] for row in rows] == ["**one fine-tune epoch** (reference)", *(f"`{m}`" for m in methods)]
    for _, seconds, ratio, mib, memory_ratio in rows:
        assert float(seconds) > 0 and float(ratio) > 0 and float(mib.replace(",", "")) >= 0
        float(memory_ratio)
    assert rows[0][2] == "1.00" and (tmp_path / "cost.json").is_file()
