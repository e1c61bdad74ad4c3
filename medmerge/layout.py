"""Where each stage writes, relative to the repository root (:func:`repo_root`); ``dvc.yaml`` declares the
same paths.

Every run that depends on a seed (``params.yaml`` ``seeds``) is one DVC stage per seed. The models a merge
reads for one seed sit together, seed first (``models/pretrained/seed_<n>/<source>``), so that a merge of
seed ``n`` depends on exactly that seed's sources; a merge's own outputs sit under its name
(``models/merge/<method>/seed_<n>``).
"""

from __future__ import annotations

import os
from pathlib import Path

RAW = Path("data/raw")
PROCESSED = Path("data/processed")
# pretrained/seed_<n>/<source>: pretrained, or a pointer to the source as given;
# <baseline>/seed_<n>/<source>: a single-source baseline (params.yaml `baselines`)
MODELS = Path("models")
SOURCES = Path("models/sources")
SETTINGS = Path("models/settings")  # <method>/<step>.json: the keys of merge each step of that merge reads
TEACHERS = Path("models/teachers")  # <method>/seed_<n>/<source>: the FT baselines a merge learns from, if any
MERGE = Path("models/merge")  # <method>/seed_<n>: coefficients, merge state, layer summary
MERGED = Path("models/merged")  # <method>/seed_<n>: the collapsed model
MERGED_FT = Path("models/merged_ft")  # <method>/seed_<n>: the collapsed model fine-tuned
REPORTS = Path("reports")

PREDICTIONS = "predictions.csv"  # in every evaluated model's directory: val and test logits


def repo_root() -> Path:
    """The real repository root: ``DVC_ROOT`` under DVC (also in temporary experiment copies), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def raw_dir(dataset: str) -> Path:
    """What ``fetch_data`` writes for ``dataset``: its :func:`raw_file` or an image manifest in place of it."""
    return RAW / dataset


def raw_file(dataset: str) -> Path:
    return raw_dir(dataset) / f"{dataset}.npz"


def processed_dir(dataset: str) -> Path:
    return PROCESSED / dataset


def seed_dir(directory: Path, seed: int) -> Path:
    return directory / f"seed_{seed}"


def source_dir(sources_from: str, source: str, seed: int) -> Path:
    """A source as seed ``seed`` uses it (``merge.sources_from``): ``pretrained`` (or used as given) or a
    baseline's model, ``models/<sources_from>/seed_<n>/<source>``."""
    return seed_dir(MODELS / sources_from, seed) / source


def settings_file(method: str, step: str) -> Path:
    """What step ``step`` (learn, collapse, finetune) of merge ``method`` reads of its settings."""
    return SETTINGS / method / f"{step}.json"


def merge_dir(stage_root: Path, method: str, seed: int) -> Path:
    """A merge's output for one seed under ``MERGE``, ``MERGED`` or ``MERGED_FT``."""
    return seed_dir(stage_root / method, seed)
