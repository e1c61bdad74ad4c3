"""Two runs of the same pipeline side by side: do the data hashes match, and do the verdicts agree?

Each run is a repository directory after ``dvc repro`` (e.g. the same commit on two machines, or on one
machine with another instruction set). Prints Markdown: the ``dvc.lock`` hashes of the outputs under
``data/`` and ``models/sources`` (equal or different), how many of all its outputs hash equal, then one row per method of ``reports/comparison.csv``
with each run's mean, paired difference, both intervals and verdict, whether each run's Δ lies inside the
other run's t interval (what "within the report's intervals" means for two runs), and how many verdicts agree.

    python scripts/compare_runs.py ../run-native ../run-avx2 --labels native AVX2
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import yaml

COMPARISON = Path("reports/comparison.csv")
HASHED_PREFIXES = ("data/", "models/sources")  # what must be identical on every CPU (docs/reproducibility.md)


def output_hashes(root: Path, prefixes: tuple[str, ...] = HASHED_PREFIXES) -> dict[str, str]:
    """``path -> md5`` of every out in ``root/dvc.lock`` under ``prefixes`` (all of them for ``("",)``)."""
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {out["path"]: out.get("md5", "") for stage in locked.values() for out in stage.get("outs", [])
            if out["path"].startswith(prefixes)}


def all_outputs_line(first: Path, second: Path) -> str:
    """How many of the two runs' outputs (every out in ``dvc.lock``: models and reports too) hash equal."""
    hashes = output_hashes(first, ("",)), output_hashes(second, ("",))
    paths = sorted(set(hashes[0]) | set(hashes[1]))
    different = [path for path in paths if hashes[0].get(path) != hashes[1].get(path)]
    line = f"Every output in `dvc.lock` (trained models and reports included): {len(paths) - len(different)} of {len(paths)} equal"
    if different:
        shown = ", ".join(f"`{path}`" for path in different[:8])
        line += f"; different: {shown}{f' and {len(different) - 8} more' if len(different) > 8 else ''}"
    return line + "."


def comparison_rows(root: Path) -> dict[str, dict[str, str]]:
    path = root / COMPARISON
    if not path.is_file():
        raise SystemExit(f"{path}: not found; run `dvc repro` there first")
    with path.open(newline="") as handle:
        return {row["method"]: row for row in csv.DictReader(handle)}


def _number(value: str) -> str:
    return "—" if value in ("", None) else f"{float(value):+.3f}"


def _cell(row: dict[str, str], metric: str) -> str:
    mean = f"{float(row[f'{metric}_mean']):.3f} ± {float(row[f'{metric}_std']):.3f}"
    if row["verdict"] == "reference":
        return f"{mean} | — | reference"
    difference = (f"{_number(row['diff'])} (t [{_number(row['t_low'])}, {_number(row['t_high'])}]; "
                  f"bootstrap [{_number(row['boot_low'])}, {_number(row['boot_high'])}])")
    return f"{mean} | {difference} | {row['verdict']}"


def inside_each_other(a: dict[str, str], b: dict[str, str]) -> bool | None:
    """Whether each run's mean difference lies inside the other run's t interval; None for the reference."""
    if "reference" in (a["verdict"], b["verdict"]) or "" in (a["t_low"], b["t_low"]):
        return None
    return all(float(y["t_low"]) <= float(x["diff"]) <= float(y["t_high"]) for x, y in ((a, b), (b, a)))


def compare(first: Path, second: Path, labels: tuple[str, str], metric: str = "f1_macro") -> tuple[str, int, int]:
    """The Markdown comparison of two runs; the number of methods whose verdicts agree, and of methods."""
    lines = ["| output | " + " | ".join(labels) + " | |", "|---|---|---|---|"]
    hashes = output_hashes(first), output_hashes(second)
    for path in sorted(set(hashes[0]) | set(hashes[1])):
        a, b = hashes[0].get(path, "—"), hashes[1].get(path, "—")
        lines.append(f"| `{path}` | `{a}` | `{b}` | {'equal' if a == b else '**different**'} |")
    lines += ["", all_outputs_line(first, second)]
    rows = comparison_rows(first), comparison_rows(second)
    lines += ["", f"| method | {labels[0]} {metric} | {labels[0]} Δ | {labels[0]} verdict | {labels[1]} {metric} | "
              f"{labels[1]} Δ | {labels[1]} verdict | each Δ in the other's t | agree |",
              "|---|---:|---|---|---:|---|---|---|---|"]
    agree, inside, compared = 0, 0, 0
    methods = [m for m in rows[0] if m in rows[1]]
    for method in methods:
        a, b = rows[0][method], rows[1][method]
        same = a["verdict"] == b["verdict"]
        agree += same
        covered = inside_each_other(a, b)
        if covered is not None:
            compared += 1
            inside += covered
        lines.append(f"| {method} | {_cell(a, metric)} | {_cell(b, metric)} | "
                     f"{'—' if covered is None else 'yes' if covered else '**no**'} | {'yes' if same else '**no**'} |")
    only = sorted(set(rows[0]) ^ set(rows[1]))
    lines += ["", f"Verdicts agree for {agree} of {len(methods)} methods; each run's Δ lies inside the other's "
              f"t interval for {inside} of {compared}."]
    if only:
        lines.append(f"In one run only: {', '.join(only)}.")
    return "\n".join(lines) + "\n", agree, len(methods)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path, help="repository directory of the first run")
    parser.add_argument("second", type=Path, help="repository directory of the second run")
    parser.add_argument("--labels", nargs=2, default=("first", "second"), metavar=("FIRST", "SECOND"))
    parser.add_argument("--metric", default="f1_macro", help="the column prefix in comparison.csv (default f1_macro)")
    args = parser.parse_args(argv)
    text, _, _ = compare(args.first, args.second, tuple(args.labels), args.metric)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
