"""MedMerge's benchmarks, run from the repository root: ``python -m benchmarks MEASUREMENT [OPTIONS]``
(``python -m benchmarks --help`` lists the measurements). Results and how to read them: README.md here."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout holding this package; child processes run there
