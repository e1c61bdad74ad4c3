"""The docs tell the truth: the README quotes the committed report, lists every module and stage, and
dvc.lock holds only stages that exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from medmerge.report import RESULTS_BEGIN, RESULTS_END, RESULTS_MARK, results_sources, with_results_block

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_results_block_is_the_committed_report() -> None:
    report = (REPO / "reports/comparison.md").read_text()
    assert with_results_block(README, report) == README, "run `python scripts/readme_results.py`"
    assert "| verdict |" in report and "Reference: `" in report


def test_every_results_block_in_the_docs_quotes_its_report() -> None:
    """README.md and docs/*.md quote committed reports only through generated blocks, each equal to its file."""
    quoted = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for source in results_sources(text):
            assert with_results_block(text, (REPO / source).read_text(), source) == text, (
                f"{path.name}: the block of {source} is stale; run `python scripts/readme_results.py`")
            quoted[source] = path.name
    assert "reports/comparison.md" in quoted


def test_results_block_rewrite_replaces_only_the_block() -> None:
    document = f"intro\n{RESULTS_BEGIN}\nold table\n{RESULTS_END}\noutro\n"
    assert with_results_block(document, "new table\n") == f"intro\n{RESULTS_BEGIN}\nnew table\n{RESULTS_END}\noutro\n"
    with pytest.raises(ValueError, match="no results block"):
        with_results_block("no markers", "table")
    other = RESULTS_MARK.format(source="examples/x/reports/comparison.md")
    two = f"{document}{other}\nold\n{RESULTS_END}\n"
    assert results_sources(two) == ["reports/comparison.md", "examples/x/reports/comparison.md"]
    assert with_results_block(two, "x\n", "examples/x/reports/comparison.md") == f"{document}{other}\nx\n{RESULTS_END}\n"


def test_readme_lists_every_library_module() -> None:
    modules = sorted(p.relative_to(REPO / "medmerge") for p in (REPO / "medmerge").rglob("*.py")
                     if p.name != "__init__.py")
    missing = [str(m) for m in modules if f"`{m.name}`" not in README]
    assert not missing, f"README's module table lacks {missing}"


def test_dvc_lock_holds_only_stages_that_exist() -> None:
    dvc = shutil.which("dvc")
    if dvc is None or not (REPO / ".dvc").is_dir():
        pytest.skip("needs the dvc command and a DVC repository")
    listed = subprocess.run([dvc, "stage", "list", "--name-only"], cwd=REPO, capture_output=True, text=True,
                            check=True, timeout=120).stdout.split()
    locked = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert set(locked) == set(listed), f"stale: {sorted(set(locked) - set(listed))}, " \
                                       f"never run: {sorted(set(listed) - set(locked))}"
