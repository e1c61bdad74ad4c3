"""Where each stage writes, relative to the repository root; ``dvc.yaml`` declares the same paths.

Every target-side run is repeated per seed (``params.yaml`` ``seeds``); its outputs sit in ``seed_<n>``
under the stage's directory.
"""

from __future__ import annotations

from pathlib import Path

RAW = Path("data/raw")
PROCESSED = Path("data/processed")
SOURCES = Path("models/sources")
PRETRAINED = Path("models/pretrained")
MERGE = Path("models/merge")  # <method>/seed_<n>: coefficients, merge state, layer summary
MERGED = Path("models/merged")  # <method>/seed_<n>: the collapsed model
MERGED_FT = Path("models/merged_ft")  # <method>/seed_<n>: the collapsed model fine-tuned
REPORTS = Path("reports")

# the single-source baselines (params.yaml `baselines`): models/<baseline>/<source>/seed_<n>
BASELINES = {"ft": Path("models/ft"), "lpft": Path("models/lpft")}


def raw_file(dataset: str) -> Path:
    return RAW / dataset / f"{dataset}.npz"


def processed_dir(dataset: str) -> Path:
    return PROCESSED / dataset


def seed_dir(directory: Path, seed: int) -> Path:
    return directory / f"seed_{seed}"


def source_dir(sources_from: str, source: str, seed: int) -> Path:
    """A source as ``merge.sources_from`` names it: pretrained (one for all seeds) or a baseline (per seed)."""
    if sources_from == "pretrained":
        return PRETRAINED / source
    return seed_dir(BASELINES[sources_from] / source, seed)
