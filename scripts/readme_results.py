"""Rewrite the results blocks of README.md and docs/*.md from the reports they name (``make demo`` runs this
after ``dvc repro``). A block starts with ``<!-- results: generated from PATH by scripts/readme_results.py;
do not edit -->`` (PATH: a report relative to the repository, e.g. ``reports/comparison.md``) and ends with
``<!-- /results -->``.

    python scripts/readme_results.py          # rewrite every block
    python scripts/readme_results.py --check  # exit 1 if a block differs from its report
"""

import argparse
import sys
from pathlib import Path

from medmerge.report import results_sources, with_results_block

ROOT = Path(__file__).resolve().parents[1]


def documents(root: Path = ROOT) -> list[Path]:
    """The files whose results blocks this script keeps: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def updated(document: str, root: Path = ROOT) -> str:
    """``document`` with every results block replaced by its report."""
    for source in results_sources(document):
        document = with_results_block(document, (root / source).read_text(), source)
    return document


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that every block quotes its report")
    args = parser.parse_args()
    stale = []
    for path in documents():
        current = path.read_text()
        new = updated(current)
        if new != current:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"{', '.join(str(p.relative_to(ROOT)) for p in stale)}: a results block differs from its report; "
              "run scripts/readme_results.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
