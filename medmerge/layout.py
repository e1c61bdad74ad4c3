"""Where each stage writes, relative to the repository root; ``dvc.yaml`` declares the same paths."""

from __future__ import annotations

from pathlib import Path

RAW = Path("data/raw")
PROCESSED = Path("data/processed")
SOURCES = Path("models/sources")
PRETRAINED = Path("models/pretrained")
FINETUNED = Path("models/finetuned")
MERGE = Path("models/merge")
MERGED = Path("models/merged")
MERGED_FT = Path("models/merged_ft")
REPORTS = Path("reports")

# the model directories that `merge.sources_from` may name
SOURCE_STAGES = {"pretrained": PRETRAINED, "finetuned": FINETUNED}


def raw_file(dataset: str) -> Path:
    return RAW / dataset / f"{dataset}.npz"


def processed_dir(dataset: str) -> Path:
    return PROCESSED / dataset
