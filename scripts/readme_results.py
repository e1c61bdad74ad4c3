"""Rewrite README.md's results block from reports/comparison.md (``make demo`` runs this after ``dvc repro``).

    python scripts/readme_results.py          # rewrite the block
    python scripts/readme_results.py --check  # exit 1 if the block differs from the report
"""

import argparse
import sys
from pathlib import Path

from medmerge.report import with_results_block

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that README.md quotes the report")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "comparison.md")
    args = parser.parse_args()
    current = args.readme.read_text()
    updated = with_results_block(current, args.report.read_text())
    if args.check:
        if updated != current:
            print(f"{args.readme}: the results block differs from {args.report}; run scripts/readme_results.py",
                  file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
