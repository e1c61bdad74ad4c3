"""A learning curve from a sweep of DVC experiments over the target's training fraction.

Reads ``dvc exp show --json`` (from a file, or runs it) and prints one Markdown table: a row per method,
a column per ``data.datasets.<target>.train_fraction`` (absent: 1.0), each cell the test macro F1 (mean
over the experiment's seeds) with its paired bootstrap interval of the difference to the reference when the
report has one. Experiments that differ in anything else than the fraction are still listed, by name.

    dvc exp run --queue -S "++data.datasets.lesions.train_fraction=0.25"   # ... one per fraction
    dvc queue start
    python scripts/learning_curve.py                       # runs `dvc exp show --json`
    python scripts/learning_curve.py --json exps.json --metric f1_macro
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

METRICS_FILE = "reports/metrics.json"


def experiments(shown: list) -> Iterator[tuple[str, str, dict, dict]]:
    """(name, timestamp, params.yaml, metrics.json) of every *finished* experiment in ``dvc exp show --json``
    output (queued, running and failed ones are skipped); the commits and the workspace themselves only if
    there is no experiment at all."""
    finished, baselines = [], []
    for entry in shown:
        baselines.append(entry)
        for experiment in entry.get("experiments") or []:
            executor = experiment.get("executor") or {}
            if executor.get("state") in ("queued", "running"):
                continue
            finished.extend(run for run in experiment.get("revs") or [] if not run.get("error"))
    for run in finished or baselines:
        data = run.get("data") or {}
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data")
        if params and metrics:
            yield run.get("name") or run.get("rev", "?"), data.get("timestamp") or "", params, metrics


def train_fraction(params: dict) -> float:
    target = params["data"]["target"]
    fraction = params["data"]["datasets"][target].get("train_fraction")
    return 1.0 if fraction is None else float(fraction)


def cell(values: dict, metric: str) -> str:
    if metric not in values:
        return "—"
    if values.get("verdict") == "reference":
        return f"{values[metric]:.3f} (reference)"
    low, high = values.get(f"{metric}_boot_low"), values.get(f"{metric}_boot_high")
    interval = f" (Δ boot [{low:+.3f}, {high:+.3f}])" if low is not None and high is not None else ""
    return f"{values[metric]:.3f}{interval}"


def table(shown: list, metric: str) -> str:
    """The Markdown table; of several experiments with one fraction, the newest."""
    points: dict[float, tuple[str, str, dict]] = {}
    for name, timestamp, params, metrics in experiments(shown):
        fraction = train_fraction(params)
        if fraction not in points or timestamp > points[fraction][1]:
            points[fraction] = (name, timestamp, metrics)
    if not points:
        raise SystemExit(f"no finished experiment with {METRICS_FILE} in the dvc exp show output")
    fractions = sorted(points)
    methods = list(dict.fromkeys(m for _, _, metrics in points.values() for m in metrics))
    lines = ["| method | " + " | ".join(f"{f:g} ({points[f][0]})" for f in fractions) + " |",
             "|---|" + "---:|" * len(fractions)]
    lines += [f"| {method} | " + " | ".join(cell(points[f][2].get(method, {}), metric) for f in fractions) + " |"
              for method in methods]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="saved `dvc exp show --json` output (default: run it)")
    parser.add_argument("--metric", default="f1_macro", help="a metric of reports/metrics.json (default f1_macro)")
    args = parser.parse_args()
    if args.json:
        shown = json.loads(args.json.read_text())
    else:
        out = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"dvc exp show failed: {out.stderr.strip()}")
        shown = json.loads(out.stdout)
    print(table(shown, args.metric))


if __name__ == "__main__":
    main()
